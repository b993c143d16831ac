"""`thinktime compare-verifiers`: scorers' picks against majority voting over one run's chains, with a plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import DeviceOpt, DtypeOpt, app, err, friendly_errors, out
from thinktime.errors import BadInputError

MARKDOWN, DATA, PLOT = "verifiers.md", "verifiers.json", "verifiers.png"


@app.command("compare-verifiers")
def compare_verifiers_command(
    run: Path = typer.Argument(..., help="A self-consistency eval run folder (texts kept, the default)."),
    scorers: list[str] = typer.Option(..., "--scorer", help="prm:PATH, orm:PATH or FAMILY:PATH (a folder `thinktime "
                                      "train prm|ppm|orm` wrote is detected); repeat to compare several."),
    n: str = typer.Option("1,4,16", "-n", help="Chains per problem to choose among, a comma list the run voted at."),
    aggregate: str = typer.Option("last", "--aggregate", help="How a PRM's step scores make a chain's score: last, "
                                  "min, prod or mean (as best-of-n's option)."),
    searches: list[Path] = typer.Option([], "--search", help="An eval run of a search strategy on the same problems "
                                        "(e.g. -s beam --option scorer=prm:PATH), shown beside the rules; repeatable."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write verifiers.md, .json and "
                                          ".png (default: the run folder)."),
    device: Optional[str] = DeviceOpt, dtype: Optional[str] = DtypeOpt,
) -> None:
    """Best-of-N and score-weighted voting by each scorer against maj@N on the same sampled chains.

    Each rule at each N with its 95% interval, tokens per problem, and the problems it wins and loses against maj@N
    with the exact sign test; search runs (PRM-guided beam) beside them; a plot of accuracy against tokens."""
    with friendly_errors():
        from thinktime.evaluation.report import graded_record_problem
        from thinktime.evaluation.store import read_records
        from thinktime.evaluation.verifiers import check_run, compare_rules, search_rules, separation
        from thinktime.scorers.base import AGGREGATES

        ns = _parse_ns(n)
        if aggregate not in AGGREGATES:
            raise BadInputError(f"unknown --aggregate {aggregate!r}", hint=f"use one of {', '.join(AGGREGATES)}")
        if not (run / "config.json").is_file():
            raise BadInputError(f"{run} is not an eval run folder (no config.json)",
                                hint="give the folder `thinktime eval -s self-consistency -o FOLDER` wrote")
        records = read_records(run, check=graded_record_problem)
        if not records:
            raise BadInputError(f"{run} has no finished problems yet", hint="run (or resume) its eval first")
        check_run(records, ns)
        scored = {spec: _scores(spec, records, aggregate, max(ns), device, dtype) for spec in scorers}
        rules = compare_rules(records, scored, ns)
        majority = next(r.correct for r in rules if r.name == f"maj@{max(ns)}")
        for folder in searches:
            rules += search_rules(folder, records, majority)
        folder = output or run
        folder.mkdir(parents=True, exist_ok=True)
        title = f"verifiers against maj@N on {len(records)} problems of {run.name}"
        separations = {spec: separation(records, scores, max(ns)) for spec, scores in scored.items()}
        (folder / DATA).write_text(json.dumps({"run": str(run), "aggregate": aggregate, "separation": separations,
                                               "rules": [r.as_dict() for r in rules]}, indent=1) + "\n")
        (folder / MARKDOWN).write_text(markdown(title, rules) + "\n" + "\n".join(_separation_lines(separations)) + "\n")
        plot(title, rules, folder / PLOT)
        out.print(table(title, rules))
        for line in _separation_lines(separations):
            out.print(line)
        out.print(f"[green]report:[/] {folder / MARKDOWN}\n[green]plot:[/]   {folder / PLOT}")


def _parse_ns(text: str) -> list[int]:
    try:
        ns = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise BadInputError(f"-n {text!r} is not a comma list of numbers", hint="e.g. -n 1,4,16") from None
    if not ns or ns[0] < 1:
        raise BadInputError("-n needs numbers of at least 1", hint="e.g. -n 1,4,16")
    return ns


def _scores(spec: str, records: list[dict], aggregate: str, n: int, device, dtype) -> list[list[float]]:
    from rich.progress import Progress

    from thinktime.evaluation.verifiers import score_chains
    from thinktime.scorers.reward_models import load_reward_model, parse_spec

    parse_spec(spec)  # a bad spec fails before any loading
    with err.status(f"loading {spec}…", spinner="dots"):
        scorer = load_reward_model(spec, device=device, dtype=dtype)
    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task(f"scoring with {spec}", total=len(records))
            return score_chains(records, scorer, aggregate, n, lambda: progress.advance(task))
    finally:
        scorer.close()


def _separation_lines(separations: dict) -> list[str]:
    """A line per scorer: how well its scores tell right chains from wrong ones."""
    lines = []
    for spec, sep in separations.items():
        if sep["auroc"] is None:
            lines.append(f"- {spec}: {sep['right']} right and {sep['wrong']} wrong chains, no AUROC without both")
        else:
            lines.append(f"- {spec}: AUROC {sep['auroc']:.3f} over {sep['right']} right and {sep['wrong']} wrong "
                         f"chains (mean score {sep['right_mean']:.3f} right, {sep['wrong_mean']:.3f} wrong)")
    return lines


def _cells(rule) -> list[str]:
    lo, hi = rule.interval
    against = rule.against
    versus = f"{against['wins']} / {against['losses']}" if against else "—"
    p = f"{against['sign_test_p']:.3g}" if against else "—"
    return [rule.name, str(len(rule.correct)), f"{100 * rule.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
            f"{rule.tokens:.0f}", versus, p]


HEADERS = ["rule", "problems", "accuracy [95% CI]", "tokens/problem", "won / lost vs maj@N", "sign test p"]


def table(title: str, rules):
    from rich.table import Table

    shown = Table(title=title)
    for header in HEADERS:
        shown.add_column(header)
    for rule in rules:
        shown.add_row(*_cells(rule))
    return shown


def markdown(title: str, rules) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(rule)) + " |" for rule in rules]
    return "\n".join(lines) + "\n"


def plot(title: str, rules, path: Path) -> None:
    """Accuracy against tokens per problem: a curve per rule family across N, search runs as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list] = {}
    for rule in rules:
        family = rule.name.replace(f"@{rule.n}", "@N").replace(f"-{rule.n} ", "-N ")
        families.setdefault(family, []).append(rule)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, members in families.items():
        xs, ys = [r.tokens for r in members], [100 * r.accuracy for r in members]
        style = "--" if family.startswith("pass@") else "-"
        ax.plot(xs, ys, style, marker="o" if len(members) > 1 else "s", label=family)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
