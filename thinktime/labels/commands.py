"""`thinktime label`, `thinktime label-compare` and `thinktime label-f1`. Light at import time: the heavy work is
imported inside the commands."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import (ApiKeyOpt, BaseUrlOpt, DeviceOpt, DtypeOpt, EngineOpt, LangOpt, MaxTokensOpt,
                                  ModelOpt, NoThinkOpt, SourceOpt, SystemPromptOpt, TopPOpt, TrustOpt, app,
                                  engine_options, err, friendly_errors, make_thinker, out)
from thinktime.errors import BadInputError
from thinktime.labels.views import figures_table

DEFAULT_RUNS_DIR = Path("runs")


@app.command("label")
def label_command(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Problems with gold answers: arith:LEVEL, "
                                          "gsm8k (its train split), math500, ... or a .jsonl file."),
    from_folder: Optional[Path] = typer.Option(None, "--from", help="Label stored chains instead of sampling: "
                                               "an eval run folder (texts kept) or a labels folder (the same "
                                               "chains relabelled, e.g. with another --seed)."),
    problems: str = typer.Option("train", "--problems", help="train: the training problems (held-out ones are "
                                 "never labelled), or heldout: the held-out ones (to evaluate verifiers)."),
    train_problems: int = typer.Option(120, "--train-problems", help="Training problems (the first of the set)."),
    eval_problems: int = typer.Option(100, "--eval-problems", help="Held out (the last of the set), as "
                                      "`thinktime bootstrap` holds them out."),
    data_seed: int = typer.Option(0, "--data-seed", help="arith: which generated problems."),
    limit: Optional[int] = typer.Option(None, "--limit", "-k", help="Only the first K problems (or chains' "
                                        "problems with --from)."),
    chains: int = typer.Option(4, "--chains", "-c", help="Chains sampled per problem."),
    rollouts: int = typer.Option(4, "--rollouts", "-K", help="Completions rolled out from each step prefix."),
    search: str = typer.Option("mc", "--search", help="mc: rollouts from every prefix; binary: binary search "
                               "for the first wrong step (OmegaPRM), the other steps inferred."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed of chains and rollouts."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Generated tokens for the whole run folder: "
                                         "stops between batches once spent (raise it and rerun to go on)."),
    batch_problems: Optional[int] = typer.Option(None, "--batch-problems", help="Problems per batch (default: "
                                                 "about 64 rollouts per prefix call)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/labels-...)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Then print agreement with another labelling "
                                           "of the same chains (a folder or labels.jsonl)."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature of chains and "
                                      "rollouts."),
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt,
    no_think: bool = NoThinkOpt, max_new_tokens: Optional[int] = MaxTokensOpt, top_p: float = TopPOpt,
    trust_remote_code: bool = TrustOpt, source: Optional[str] = SourceOpt,
    base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt,
) -> None:
    """Monte Carlo step labels from rollouts; resumable (rerun the same command after a crash).

    Samples chains, rolls out K completions from each step prefix, and labels each step by the share of them
    that reach the gold answer."""
    with friendly_errors(interrupted="run the same command again to resume where it stopped"):
        from thinktime.labels.run import LabelSettings, check_settings

        settings = LabelSettings(chains=chains, rollouts=rollouts, search=search, seed=seed,
                                 batch_problems=batch_problems, budget=budget)
        check_settings(settings, temperature)
        work, source = _work(dataset, from_folder, problems, train_problems, eval_problems, data_seed, limit)
        if compare is not None:
            from thinktime.labels.store import labels_path

            labels_path(compare)  # a wrong path is said before any model loads
        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens,
                               temperature, top_p, seed, trust_remote_code, source,
                               **engine_options(base_url, api_key))
        folder = _run(thinker, settings, work, source, output)
        if compare is not None:
            _print_comparison(folder, compare)


def _work(dataset, from_folder, part, train_problems, eval_problems, data_seed, limit) -> tuple[dict, dict]:
    """What to label ({"problems": ...} or {"chains": ...}) and how the configuration names its source."""
    from thinktime.evaluation.splits import fingerprint, select_problems
    from thinktime.labels.chains import chains_from_folder

    if limit is not None and limit < 1:
        raise BadInputError("--limit must be at least 1")
    if (dataset is None) == (from_folder is None):
        raise BadInputError("give one of --dataset and --from", hint="thinktime label -d arith:2 (sample chains), "
                            "or --from RUN_FOLDER (label stored chains)")
    if from_folder is not None:
        stored, source = chains_from_folder(from_folder)
        keep = set(list(dict.fromkeys(c.problem.id for c in stored))[:limit])
        return {"chains": [c for c in stored if c.problem.id in keep]}, source
    name, chosen = select_problems(dataset, part, train_problems, eval_problems, data_seed)
    source = {"dataset": name, "problems": part, "train_problems": train_problems, "eval_problems": eval_problems,
              "data_seed": data_seed, "dataset_fingerprint": fingerprint(chosen)}
    return {"problems": chosen[:limit]}, source


def _run(thinker, settings, work: dict, source: dict, output: Optional[Path]) -> Path:
    from thinktime.evaluation.store import config_hash
    from thinktime.labels.progress import LabelProgress
    from thinktime.labels.run import build_config, run_labels, spent
    from thinktime.labels.store import LabelStore

    config = build_config(thinker, settings, source)
    folder = output or _default_folder(config, config_hash(config))
    if "chains" in work:
        wanted = {(c.problem.id, c.index) for c in work["chains"]}
    else:
        wanted = {(p.id, i) for p in work["problems"] for i in range(settings.chains)}
    with LabelStore(folder, config) as store:
        earlier = [r for r in store.records if (r["id"], r.get("chain", 0)) in wanted]
        err.print(f"[dim]run folder: {folder}" + (f" · resuming, {len(earlier)}/{len(wanted)} chains done"
                                                  if earlier else "") + "[/]")
        with LabelProgress(len(wanted), earlier, err) as progress:
            reason = run_labels(thinker, store, settings, on_rows=progress.update, **work)
        total = spent(store)
    if reason == "budget":
        err.print(f"[yellow]budget spent: {total:,} generated tokens of --budget {settings.budget:,}; "
                  f"raise --budget and run the same command to go on[/]")
    _print_statistics(folder)
    out.print(f"[green]labels:[/] {Path(folder) / 'labels.jsonl'}")
    return Path(folder)


def _default_folder(config: dict, digest: str) -> Path:
    what = config.get("dataset") or f"from-{config.get('from')}"
    slug = f"labels-{what}-{config['search']}-c{config['chains']}-k{config['rollouts']}-{config['model']}"
    return DEFAULT_RUNS_DIR / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', slug)[:80]}-{digest}"


def _print_statistics(folder: Path) -> None:
    from thinktime.labels.agreement import label_statistics
    from thinktime.labels.store import read_labels

    out.print(figures_table("step labels", label_statistics(read_labels(folder))))


@app.command("label-compare")
def label_compare_command(
    first: Path = typer.Argument(..., help="A labels folder or labels.jsonl."),
    second: Path = typer.Argument(..., help="Another labelling of the same chains (e.g. --from FIRST --seed 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Label noise: agreement of two labellings of the same chains, matched by problem and step texts."""
    with friendly_errors():
        _print_comparison(first, second, as_json)


def _print_comparison(first: Path, second: Path, as_json: bool = False) -> None:
    from thinktime.labels.agreement import compare_labels
    from thinktime.labels.store import read_labels

    figures = compare_labels(read_labels(first), read_labels(second))
    if not figures["chains"]:
        raise BadInputError(f"{first} and {second} share no chain", hint="label the same chains twice: "
                            "thinktime label --from FIRST_FOLDER --seed 1")
    if as_json:
        print(json.dumps(figures))
    else:
        out.print(figures_table(f"agreement: {first} vs {second}", figures))


import thinktime.labels.f1_command  # noqa: E402,F401  (label-f1)
