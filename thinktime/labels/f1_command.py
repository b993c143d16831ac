"""`thinktime label-f1`: a scorer's step-level F1 (ProcessBench) against rollout labels."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from thinktime.cli_common import (DeviceOpt, DtypeOpt, EngineOpt, LangOpt, ModelOpt, NoThinkOpt, SystemPromptOpt,
                                  app, err, friendly_errors, make_thinker, out)
from thinktime.errors import BadInputError
from thinktime.labels.views import figures_table

SELF = ("self", "self-judge")


@app.command("label-f1")
def label_f1_command(
    labels: Path = typer.Option(..., "--labels", help="Step labels: a labels.jsonl or the folder `thinktime "
                                "label` wrote (label held-out problems for a fair test: --problems heldout)."),
    scorer: str = typer.Option(..., "--scorer", help="self (or self-judge: the model judges each prefix), "
                               "prm:PATH, orm:PATH, or FAMILY:PATH."),
    threshold: float = typer.Option(0.5, "--threshold", help="A step scored below it is predicted wrong."),
    limit: Optional[int] = typer.Option(None, "--limit", "-k", help="Only the first K labelled chains."),
    judge_tokens: int = typer.Option(128, "--judge-tokens", help="self: the most tokens per judgement."),
    judges: int = typer.Option(1, "--judges", help="self: judgements per prefix (sampled when above 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    model: Optional[str] = ModelOpt, engine: str = EngineOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, lang: str = LangOpt, system_prompt: Optional[Path] = SystemPromptOpt,
    no_think: bool = NoThinkOpt, seed: int = typer.Option(0, "--seed", help="self with --judges > 1: seed."),
) -> None:
    """Step-level F1 of a scorer's first wrong step against rollout labels (ProcessBench).

    Accuracy on chains with a wrong step (the step must be named) and on chains without (none must be), and
    their harmonic mean."""
    with friendly_errors():
        from thinktime.labels.f1 import evaluate_scorer
        from thinktime.labels.store import read_labels

        if not 0 <= threshold <= 1:
            raise BadInputError("--threshold is a score in [0, 1]")
        if limit is not None and limit < 1:
            raise BadInputError("--limit must be at least 1")
        rows = [r for r in read_labels(labels) if r["completions"]][:limit]
        if not rows:
            raise BadInputError(f"{labels} holds no labelled steps", hint="run `thinktime label` first")
        scorer_for = _scorer_factory(scorer, judges, judge_tokens, model, engine, device, dtype, lang,
                                     system_prompt, no_think, seed)
        with err.status(f"scoring {len(rows)} chains with {scorer}…", spinner="dots"):
            figures = evaluate_scorer(rows, scorer_for, threshold)
        if as_json:
            print(json.dumps(figures))
            return
        out.print(figures_table(f"step-level F1 of {scorer} (threshold {threshold:g})", figures))


def _scorer_factory(spec, judges, judge_tokens, model, engine, device, dtype, lang, system_prompt, no_think, seed):
    """A function of the question giving the scorer: a reward model loaded once, or the model judging itself."""
    if spec in SELF:
        from thinktime.scorers.self_judge import SelfJudge

        if judges < 1 or judge_tokens < 1:
            raise BadInputError("--judges and --judge-tokens must be at least 1")
        thinker = make_thinker(model, engine, device, dtype, lang, system_prompt, no_think, judge_tokens,
                               0.7 if judges > 1 else 0.0, 1.0, seed, False, None)
        return lambda question: SelfJudge(thinker.context(question), judges=judges, max_tokens=judge_tokens,
                                          partial=True)
    from thinktime.scorers.reward_models import load_reward_model, parse_spec

    parse_spec(spec)  # a bad spec fails before any loading
    with err.status(f"loading {spec}…", spinner="dots"):
        reward_model = load_reward_model(spec, device=device, dtype=dtype)
    return lambda question: reward_model
