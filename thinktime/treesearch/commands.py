"""`thinktime tree-pairs`: step preference pairs and SFT rows from MCTS with rollouts to the gold answer.
Light at import time: the model and the search are imported inside the command."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import (DeviceOpt, DtypeOpt, EngineOpt, LangOpt, ModelOpt, NoThinkOpt, SystemPromptOpt, app,
                                  err, friendly_errors, make_thinker, out)


@app.command("tree-pairs")
def tree_pairs_command(
    output: Path = typer.Option(..., "--output", "-o", help="Run folder (rerun the same command to resume it)."),
    dataset: str = typer.Option("arith:2", "--dataset", "-d", help="Problems with gold answers: arith:LEVEL, gsm8k, "
                                "math500, ... or a .jsonl file."),
    split: Optional[str] = typer.Option(None, "--split", help="Default: the set's train split where it has one."),
    problems: int = typer.Option(20, "--problems", "-n", help="Problems searched: the first N of the set (more "
                                 "later extends the run)."),
    eval_problems: int = typer.Option(100, "--eval-problems", help="Never searched: the set's last N problems, "
                                      "which `thinktime bootstrap` holds out."),
    data_seed: int = typer.Option(0, "--data-seed", help="arith: which generated problems."),
    iterations: int = typer.Option(16, "--iterations", "-i", help="MCTS rounds per problem (select, expand, roll "
                                   "out, back up)."),
    expansions: int = typer.Option(2, "--expansions", help="Next steps sampled at each expanded node."),
    depth: int = typer.Option(8, "--depth", help="The most steps in a chain."),
    step_tokens: int = typer.Option(96, "--step-tokens", help="The most tokens per step."),
    rollouts: int = typer.Option(1, "--rollouts", help="Rollouts to an answer from each new node."),
    rollout_tokens: int = typer.Option(256, "--rollout-tokens", help="The most tokens per rollout."),
    exploration: float = typer.Option(1.0, "--exploration", help="UCT exploration weight."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="Sampling temperature of steps and rollouts."),
    seed: int = typer.Option(0, "--seed", help="Makes the search reproducible."),
    margin: float = typer.Option(0.5, "--margin", help="Least Q(chosen) - Q(rejected) of a pair (Q in [-1, 1])."),
    max_similarity: float = typer.Option(0.9, "--max-similarity", help="Drop pairs whose two steps are at least this "
                                         "similar (difflib ratio, 0..1)."),
    per_side: int = typer.Option(2, "--per-side", help="Children per side at each node: the top N by Q with a "
                                 "correct outcome below against the bottom N with a wrong one."),
    keep: int = typer.Option(1, "--keep", help="SFT rows per problem: its best correct chains."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Generated tokens for the whole run folder (a "
                                         "resumed run counts its recorded trees)."),
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt,
    no_think: bool = NoThinkOpt,
) -> None:
    """MCTS over steps with rollouts graded against the gold answer (rStar-Math): pairs.jsonl, sft.jsonl."""
    with friendly_errors(interrupted="rerun the same command to resume"):
        from thinktime.treesearch.pairs import PairFilter
        from thinktime.treesearch.run import TreeRun, check_run, tree_run
        from thinktime.treesearch.search import TreeSettings

        search = TreeSettings(iterations=iterations, expansions=expansions, depth=depth, step_tokens=step_tokens,
                              rollouts=rollouts, rollout_tokens=rollout_tokens, exploration=exploration,
                              temperature=temperature, seed=seed)
        run = TreeRun(dataset=dataset, split=split, data_seed=data_seed, search=search, keep=keep,
                      rules=PairFilter(margin=margin, max_similarity=max_similarity, per_side=per_side),
                      budget=budget)
        check_run(run)
        chosen = _problems(dataset, split, problems, eval_problems, data_seed)
        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, rollout_tokens,
                               temperature, 1.0, seed, False, None)
        with TreeProgress(len(chosen), output) as progress:
            summary = tree_run(thinker, chosen, output, run, on_record=progress.update)
        _print_summary(summary, output)


def _problems(dataset: str, split: Optional[str], count: int, held_out: int, data_seed: int) -> list:
    """The first `count` problems of the set, none of its last `held_out` (which `thinktime bootstrap` and
    `thinktime label` hold out for evaluation): from the train split where the set has one."""
    from thinktime.errors import BadInputError
    from thinktime.evaluation.splits import load_for_training, training_problems

    if count < 1 or held_out < 0:
        raise BadInputError("--problems must be at least 1 and --eval-problems 0 or more")
    full = load_for_training(dataset, split, count, held_out, data_seed, hint="lower --problems or --eval-problems")
    return training_problems(full, count, held_out)


class TreeProgress:
    """A progress bar over problems: those already recorded count as done; pairs so far in the status."""

    def __init__(self, total: int, folder: Path):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from thinktime.evaluation.store import read_records
        from thinktime.treesearch.run import TREES

        done = len(read_records(folder, name=TREES))
        self.solved = 0
        self.progress = Progress(TextColumn("[bold]tree-pairs[/]"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=err)
        self.task = self.progress.add_task("trees", total=total, completed=min(done, total), status="")
        if done:
            err.print(f"resuming, {min(done, total)}/{total} trees done")

    def update(self, record: dict) -> None:
        self.solved += bool(record["solved"])
        self.progress.update(self.task, advance=1, status=f"solved {self.solved} this run · "
                             f"{record['completion_tokens']} tokens, {record['seconds']:.0f} s last tree")

    def __enter__(self) -> "TreeProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _print_summary(summary: dict, folder: Path) -> None:
    out.print(f"[green]{folder}[/]: {summary['problems']} trees, {summary['solved']} solved, "
              f"{summary['pairs']} pairs from {summary['problems_with_pairs']} problems, "
              f"{summary['sft_rows']} SFT rows, "
              f"{summary['completion_tokens']} tokens")
    if summary["stopped"]:
        out.print(f"[yellow]stopped:[/] {summary['stopped']} (raise --budget and run the same command to go on)")
    out.print(f"SFT rows: {folder / 'sft.jsonl'} (thinktime train sft --data ...); "
              f"step pairs: {folder / 'pairs.jsonl'} (thinktime train ppm --data ...)")
