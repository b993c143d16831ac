"""`thinktime eval` and `thinktime report`. Light at import time: the heavy work is imported inside."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import (ApiKeyOpt, BaseUrlOpt, DataParallelOpt, DeviceOpt, DtypeOpt, EngineOpt, ExecutorOpt, LangOpt,
                           MaxTokensOpt, ModelOpt, NoThinkOpt, PipelineParallelOpt, SourceOpt, SystemPromptOpt,
                           TensorParallelOpt, TopPOpt, TrustOpt, make_thinker, app, engine_options, err,
                           friendly_errors, out)
from thinktime.errors import BadInputError
from thinktime.strategies import STRATEGIES

DEFAULT_RUNS_DIR = Path("runs")


def typed_options(strategy: str, items: list[str]) -> dict:
    """`--option width=4 --option scorer=self` -> {"width": 4, "scorer": "self"}: each value as its option's
    type (the run's config records them so); options of the n-list strategies are kept as given, to be refused."""
    from thinktime.cli_views import parse_options
    from thinktime.evaluation.runner import SAMPLED
    from thinktime.strategies import check_options, get_strategy

    options = parse_options(items)
    if not options or strategy in SAMPLED:
        return options
    get_strategy(strategy)  # an unknown name is said as such, not as options it lacks
    return check_options(strategy, options)


def default_folder(config: dict, digest: str) -> Path:
    slug = f"{config['dataset']}-{config['strategy']}-n{max(config['n'])}-{config['model']}"
    return DEFAULT_RUNS_DIR / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', slug)[:80]}-{digest}"


def _print_report(folders: list[Path], output: Optional[Path]) -> None:
    from thinktime.evaluation.report import rich_tables, write_report

    summaries, md, png = write_report(folders, output)
    for table in rich_tables(summaries):
        out.print(table)
    disagreements = sum(len(s.disagreements) for s in summaries)
    if disagreements:
        out.print(f"[yellow]{disagreements} answers where math-verify and the simple grader disagree "
                  f"(listed in the markdown)[/]")
    out.print(f"[green]report:[/] {md}\n[green]plot:[/]   {png}")


@app.command("eval")
def eval_command(
    dataset: str = typer.Option(..., "--dataset", "-d", help="gsm8k, math500, aime24, aime25, cmath, arith "
                                "(arith:1 .. arith:5 for one level), or a .jsonl file."),
    strategy: str = typer.Option("cot", "--strategy", "-s", help=f"{', '.join(STRATEGIES)} (`thinktime "
                                 "strategies` lists each one's options). cot and self-consistency sample once at "
                                 "the largest n; other strategies run through the registry once per n."),
    n: str = typer.Option("1", "-n", help="Samples per problem, a comma list: 1,4,16."),
    limit: Optional[int] = typer.Option(None, "--limit", "-k", help="Only the first K problems."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (each problem derives its own from it)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/<config>-<hash>)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with local JSONL copies "
                                            "(default: $THINKTIME_DATA_DIR, else the dataset's public home)."),
    split: Optional[str] = typer.Option(None, "--split", help="Dataset split (default: test)."),
    data_seed: int = typer.Option(0, "--data-seed", help="Seed of the generated arith set."),
    problems: str = typer.Option("all", "--problems", help="all, or heldout / train: the problems `thinktime "
                                 "bootstrap` and `label` hold out or train on (see --train-problems)."),
    train_problems: int = typer.Option(120, "--train-problems", help="With --problems: training problems (the "
                                       "first of the set)."),
    eval_problems: int = typer.Option(100, "--eval-problems", help="With --problems: held out (the last)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t",
                                                help="Default: 0 (greedy) for -n 1, 0.7 when sampling more."),
    budget_tokens: Optional[int] = typer.Option(None, "--budget-tokens", help="Token cap per problem for "
                                                "registry strategies."),
    option: list[str] = typer.Option([], "--option", help="Strategy option key=value (repeatable; `thinktime "
                                     "strategies` lists them with types and defaults)."),
    scale_option: Optional[str] = typer.Option(None, "--scale-option", help="The strategy option that -n sets "
                                               "(default: n, rounds, max_tokens, width or iterations by strategy)."),
    batch_problems: Optional[int] = typer.Option(None, "--batch-problems", help="Problems per engine call "
                                                 "(default: 8 sequences per call)."),
    save_text: bool = typer.Option(True, "--save-text/--no-save-text", help="Keep each chain's text in the records."),
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt,
    no_think: bool = NoThinkOpt, max_new_tokens: Optional[int] = MaxTokensOpt, top_p: float = TopPOpt,
    trust_remote_code: bool = TrustOpt, source: Optional[str] = SourceOpt,
    base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt,
    tensor_parallel_size: Optional[int] = TensorParallelOpt, pipeline_parallel_size: Optional[int] = PipelineParallelOpt,
    data_parallel_size: Optional[int] = DataParallelOpt, distributed_executor_backend: Optional[str] = ExecutorOpt,
) -> None:
    """Measure accuracy against thinking time; resumable (rerun the same command after a crash)."""
    with friendly_errors(interrupted="run the same command again to resume where it stopped"):
        from thinktime.evaluation.runner import (DEFAULT_SAMPLING_TEMPERATURE, Settings, build_config, check_settings,
                                                 parse_ns)
        from thinktime.evaluation.store import config_hash

        if batch_problems is not None and batch_problems < 1:
            raise BadInputError("--batch-problems must be at least 1")
        settings = Settings(strategy=strategy, ns=parse_ns(n), seed=seed, batch_problems=batch_problems,
                            options=typed_options(strategy, option), budget_tokens=budget_tokens,
                            save_text=save_text, scale_option=scale_option)
        data = _problems(dataset, split, data_dir, limit, data_seed, problems, train_problems, eval_problems)
        if temperature is None:  # an n-list samples n chains; a registry strategy's -n is its own size, and
            # those that sample several chains (best-of-n, beam, mcts) choose their temperature themselves
            temperature = DEFAULT_SAMPLING_TEMPERATURE if settings.sampled and settings.max_n > 1 else 0.0
        check_settings(settings, temperature)
        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, max_new_tokens,
                               temperature, top_p, seed, trust_remote_code, source, **engine_options(
                                   base_url, api_key, tensor_parallel_size, pipeline_parallel_size,
                                   data_parallel_size, distributed_executor_backend))
        config = build_config(thinker, data, settings)
        _run_and_report(thinker, data, settings, config, output or default_folder(config, config_hash(config)))


def _problems(dataset, split, data_dir, limit, data_seed, part, train_problems, eval_problems):
    """The dataset, or the part of it that training holds out (or trains on)."""
    from thinktime.evaluation.datasets import load_dataset

    if part not in ("all", "train", "heldout"):
        raise BadInputError(f"unknown --problems {part!r}", hint="use all (the default), heldout or train")
    if part == "all":
        return load_dataset(dataset, split=split, data_dir=data_dir, limit=limit, data_seed=data_seed)
    if split is not None or data_dir is not None:
        raise BadInputError("--problems takes the split training uses; drop --split and --data-dir",
                            hint="set THINKTIME_DATA_DIR for local copies")
    from thinktime.evaluation.splits import part_dataset

    return part_dataset(dataset, part, train_problems, eval_problems, data_seed, limit)


def _run_and_report(thinker, data, settings, config: dict, folder: Path) -> None:
    """Runs (or resumes) the eval in its folder with live progress, then prints the folder's report."""
    from thinktime.evaluation.progress import EvalProgress
    from thinktime.evaluation.runner import run_eval
    from thinktime.evaluation.store import RunStore

    with RunStore(folder, config) as store:
        done = len(store.done & {p.id for p in data.problems})
        err.print(f"[dim]run folder: {folder}" + (f" · resuming, {done}/{len(data)} done" if done else "") + "[/]")
        with EvalProgress(len(data), store.records, data.problems, err) as progress:
            run_eval(thinker, data, store, settings, on_record=progress.update)
        beyond = len(store.done - {p.id for p in data.problems})
    _print_report([Path(folder)], None)
    if beyond:
        err.print(f"[yellow]The report covers the whole folder: {len(data) + beyond} problems, {beyond} of "
                  f"them from an earlier eval with a larger --limit.[/]")


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run folders written by `thinktime eval`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where report.md and the PNG go "
                                          "(default: the run folder; for several runs, report/ beside them)."),
) -> None:
    """Tables, a markdown report and the accuracy-vs-tokens plot for one or more runs."""
    with friendly_errors():
        _print_report(list(runs), output)
