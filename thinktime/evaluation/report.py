"""Reports on one or more runs: a rich table, a markdown file, and the thinking-time curve as a PNG.

Each run gives one point per n: accuracy (math-verify) with its 95% Wilson interval, the simple
grader's accuracy beside it, pass@k (unbiased, from the same samples), and the average completion
tokens per problem that point costs. Strategies are compared at equal token budgets: for each
budget, the best accuracy each run reaches without spending more.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thinktime.errors import BadInputError
from thinktime.evaluation.metrics import best_within_budget, pass_at_k, wilson
from thinktime.evaluation.store import read_config, read_records

MARKDOWN = "report.md"
PLOT = "accuracy_vs_tokens.png"
MAX_LISTED_DISAGREEMENTS = 50


@dataclass
class Point:
    label: str
    k: int
    problems: int
    correct: int
    simple_correct: int
    avg_tokens: float
    pass_at_k: float | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems if self.problems else 0.0

    @property
    def simple_accuracy(self) -> float:
        return self.simple_correct / self.problems if self.problems else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.problems)


@dataclass
class Disagreement:
    id: str
    answer: str | None
    gold: str
    math_verify: bool
    simple: bool


@dataclass
class RunSummary:
    folder: Path
    name: str
    config: dict
    problems: int
    points: list[Point]
    seconds: float
    completion_tokens: int
    prompt_tokens: int
    disagreements: list[Disagreement] = field(default_factory=list)
    ids: frozenset = frozenset()  # the problems it covers

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def _label(strategy: str, k: int, ns: list[int], sampled: bool, scale: str | None, temperature: float = 0.0) -> str:
    if sampled:
        if strategy == "cot" and ns == [1]:
            return "cot"
        if k == 1:
            return "sample@1" if temperature else "greedy"
        return f"maj@{k}"
    return f"{strategy} {scale}={k}" if scale else strategy


# Strategies that sample several chains at this temperature when the run's is 0 (thinktime/sampling.py).
_SAMPLE_THEMSELVES = {"best-of-n", "beam", "mcts", "allocation"}


def run_name(config: dict) -> str:
    from thinktime.sampling import DEFAULT_SAMPLING_TEMPERATURE

    temperature = config.get("temperature", 0)
    strategy = config.get("strategy")
    # self-consistency given options runs through the registry, which samples it the same way
    registry_sc = strategy == "self-consistency" and config.get("options")
    if not temperature and (strategy in _SAMPLE_THEMSELVES or registry_sc):
        temperature = DEFAULT_SAMPLING_TEMPERATURE
    decoding = "greedy" if not temperature else f"T={temperature:g}"
    return f"{config.get('strategy')} · {config.get('model')} · {config.get('dataset')} · {decoding}"


def graded_record_problem(record: dict) -> str | None:
    """What keeps a record from being reported (None: nothing): the fields the runner writes and this reads."""
    missing = [key for key in ("gold", "by_k") if key not in record]
    if missing:
        return f"no {', '.join(missing)}"
    by_k, candidates = record["by_k"], record.get("candidates", [])
    if not isinstance(by_k, dict) or not all(isinstance(v, dict) and {"correct", "simple", "tokens", "answer"} <= v.keys()
                                             for v in by_k.values()):
        return "by_k is not an object of graded results"
    if not isinstance(candidates, list) or not all(isinstance(c, dict) and {"correct", "simple", "answer"} <= c.keys()
                                                   for c in candidates):
        return "candidates is not a list of graded answers"
    return None


def summarize(folder: str | Path) -> RunSummary:
    folder = Path(folder)
    stored = read_config(folder)
    config = stored.get("config", {})
    records = read_records(folder, check=graded_record_problem)
    if not records:  # an accuracy of 0/0 would read as 0%
        raise BadInputError(f"{folder} has no finished problems yet",
                            hint="run (or resume) its eval first: the same `thinktime eval` command")
    ns = [int(k) for k in config.get("n", [1])]
    sampled = config.get("strategy") in ("cot", "self-consistency")
    points = []
    for k in ns:
        rows = [r["by_k"][str(k)] for r in records if str(k) in r.get("by_k", {})]
        estimate = None
        # Unbiased only where every problem drew k chains: a rule that stopped early drew fewer on some.
        if sampled and records and all(len(r["candidates"]) >= k for r in records):
            estimate = sum(pass_at_k(len(r["candidates"]), sum(c["correct"] for c in r["candidates"]), k)
                           for r in records) / len(records)
        points.append(Point(_label(config.get("strategy", "?"), k, ns, sampled, config.get("scale_option"),
                                   config.get("temperature") or 0.0), k, len(rows),
                            sum(bool(r["correct"]) for r in rows), sum(bool(r["simple"]) for r in rows),
                            sum(r["tokens"] for r in rows) / len(rows) if rows else 0.0, estimate))
    disagreements: dict[tuple, Disagreement] = {}
    for r in records:
        judged = [(c["answer"], c["correct"], c["simple"]) for c in r.get("candidates", [])]
        judged += [(v["answer"], v["correct"], v["simple"]) for v in r.get("by_k", {}).values()]
        for answer, math_ok, simple_ok in judged:
            if bool(math_ok) != bool(simple_ok):
                disagreements.setdefault((r["id"], answer), Disagreement(r["id"], answer, r["gold"], math_ok,
                                                                         simple_ok))
    return RunSummary(folder, run_name(config), config, len(records), points,
                      sum(r.get("seconds", 0.0) for r in records),
                      sum(r.get("completion_tokens", 0) for r in records),
                      sum(r.get("prompt_tokens", 0) for r in records), list(disagreements.values()),
                      frozenset(r["id"] for r in records))


def distinct_names(summaries: list[RunSummary]) -> None:
    """Runs whose names are alike (same strategy, model, dataset, decoding) are told apart by their folders."""
    alike = {s.name for s in summaries if sum(t.name == s.name for t in summaries) > 1}
    for s in summaries:
        if s.name in alike:
            s.name = f"{s.name} · {s.folder.name}"


def problem_set_note(summaries: list[RunSummary]) -> str | None:
    """A warning when the runs compared do not cover the same problems."""
    if len({s.ids for s in summaries}) <= 1:
        return None
    return ("the runs cover different problems (" + ", ".join(str(s.problems) for s in summaries) +
            "): their accuracies are not measured on the same set; compare runs of the same dataset and --limit")


def budget_table(summaries: list[RunSummary]) -> tuple[list[float], list[list[float | None]]]:
    """Budgets (the token costs of every point) and, per run, its best accuracy within each."""
    # Exact costs (rounded only when shown): a rounded-down budget would leave out the point it came from.
    budgets = sorted({p.avg_tokens for s in summaries for p in s.points if p.problems})
    rows = [[best_within_budget([(p.avg_tokens, p.accuracy) for p in s.points if p.problems], b) for b in budgets]
            for s in summaries]
    return budgets, rows


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(point: Point) -> str:
    lo, hi = point.interval
    return f"{100 * point.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _rows(summaries: list[RunSummary]) -> list[list[str]]:
    rows = []
    for s in summaries:
        for p in s.points:
            rows.append([s.name, p.label, str(p.problems), _ci(p), _pct(p.simple_accuracy), _pct(p.pass_at_k),
                         f"{p.avg_tokens:.1f}"])
    return rows


HEADERS = ["run", "setting", "problems", "accuracy [95% CI]", "simple grader", "pass@k", "avg tokens"]


def rich_tables(summaries: list[RunSummary]):
    from rich.table import Table

    table = Table(title="accuracy against thinking tokens")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("run", "setting") else "right")
    for row in _rows(summaries):
        table.add_row(*row)
    runs = Table(title="runs")
    for h in ("run", "folder", "problems", "tokens/s", "time (s)", "grader disagreements"):
        runs.add_column(h)
    for s in summaries:
        runs.add_row(s.name, str(s.folder), str(s.problems), f"{s.tokens_per_second:.1f}", f"{s.seconds:.1f}",
                     str(len(s.disagreements)))
    tables = [table, runs]
    if len(summaries) > 1:
        budgets, best = budget_table(summaries)
        equal = Table(title="at equal token budgets: best accuracy within the budget")
        equal.add_column("avg tokens ≤", justify="right")
        for s in summaries:
            equal.add_column(s.name, justify="right")
        for i, b in enumerate(budgets):
            equal.add_row(f"{b:.1f}", *[_pct(row[i]) for row in best])
        note = problem_set_note(summaries)
        if note:
            equal.caption = f"Note: {note}"
        tables.append(equal)
    return tables


def markdown(summaries: list[RunSummary], plot_name: str | None = PLOT) -> str:
    def table(headers: list[str], rows: list[list[str]]) -> list[str]:
        esc = [[" ".join(c.split("\n")).replace("|", "\\|") for c in r] for r in rows]  # a cell is one line
        return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *("| " + " | ".join(r) + " |" for r in esc)]

    lines = ["# thinktime eval report", ""]
    lines += table(HEADERS, _rows(summaries)) + [""]
    lines += ["Accuracy is graded by math-verify; 95% Wilson intervals in brackets. maj@k votes over the first k "
              "samples; pass@k is the unbiased estimator over all samples. Tokens are completion tokens.", ""]
    lines += ["## Runs", ""]
    lines += table(["run", "folder", "problems", "prompt tokens", "completion tokens", "tokens/s", "time (s)"],
                   [[s.name, f"`{s.folder}`", str(s.problems), str(s.prompt_tokens), str(s.completion_tokens),
                     f"{s.tokens_per_second:.1f}", f"{s.seconds:.1f}"] for s in summaries]) + [""]
    for s in summaries:
        settings = ", ".join(f"{k}={v}" for k, v in s.config.items() if k not in ("dataset_fingerprint",))
        lines += [f"- {s.name}: {settings}"]
    lines.append("")
    if len(summaries) > 1:
        budgets, best = budget_table(summaries)
        lines += ["## At equal token budgets", "", "Best accuracy each run reaches spending at most this many "
                  "completion tokens per problem on average.", ""]
        note = problem_set_note(summaries)
        if note:
            lines += [f"**Note:** {note}.", ""]
        lines += table(["avg tokens ≤", *[s.name for s in summaries]],
                       [[f"{b:.1f}", *[_pct(row[i]) for row in best]] for i, b in enumerate(budgets)]) + [""]
    if plot_name:
        lines += ["## Thinking-time curve", "", f"![accuracy against average tokens per problem]({plot_name})", ""]
    lines += ["## Grader disagreements", ""]
    listed = [(s, d) for s in summaries for d in s.disagreements]
    if not listed:
        lines += ["math-verify and the simple grader agree on every answer.", ""]
    else:
        lines += [f"{len(listed)} answers judged differently by math-verify and the simple (normalised "
                  f"string/number) grader" + (f"; the first {MAX_LISTED_DISAGREEMENTS}:" if len(listed) >
                                              MAX_LISTED_DISAGREEMENTS else ":"), ""]
        lines += table(["run", "problem", "answer", "gold", "math-verify", "simple"],
                       [[s.name, d.id, f"`{d.answer}`", f"`{d.gold}`", "✓" if d.math_verify else "✗",
                         "✓" if d.simple else "✗"] for s, d in listed[:MAX_LISTED_DISAGREEMENTS]]) + [""]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot, drawing into files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lays the figure out, writes it (its folder made where missing) and closes it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot(summaries: list[RunSummary], path: str | Path) -> Path:
    """Accuracy (with 95% intervals) against average completion tokens per problem, one line per run."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5), dpi=120)
    xs_all = []
    for s in summaries:
        points = [p for p in s.points if p.problems]
        if not points:
            continue
        xs = [p.avg_tokens for p in points]
        ys = [100 * p.accuracy for p in points]
        lows = [max(0.0, 100 * (p.accuracy - p.interval[0])) for p in points]
        highs = [max(0.0, 100 * (p.interval[1] - p.accuracy)) for p in points]
        ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=f"{s.name} ({s.problems} problems)")
        for p, x, y in zip(points, xs, ys):
            ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        xs_all += xs
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 8:
        ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set_xlabel("average completion tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy against thinking time")
    ax.grid(alpha=0.3)
    if xs_all:
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def write_report(folders: list[str | Path], output: str | Path | None = None) -> tuple[list[RunSummary], Path, Path]:
    """Summaries of the runs, the markdown file and the PNG written into `output`."""
    if not folders:
        raise BadInputError("no run given", hint="thinktime report runs/<run-folder> [more runs...]")
    summaries = [summarize(f) for f in folders]
    distinct_names(summaries)
    if output is None:
        output = Path(folders[0]) if len(folders) == 1 else Path(folders[0]).parent / "report"
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    png = plot(summaries, output / PLOT)
    md = output / MARKDOWN
    md.write_text(markdown(summaries, PLOT), encoding="utf-8")
    return summaries, md, png
