"""Scorers judge chains: reward models loaded through transformers, or the policy model judging itself."""
from __future__ import annotations

import threading

from thinktime.scorers.base import AGGREGATES, Scorer, aggregate

_loaded: dict[tuple[str, str], Scorer] = {}
_loading = threading.Lock()


def make_scorer(ctx, spec, *, partial: bool = False, judges: int = 1, judge_tokens: int = 256) -> Scorer:
    """A scorer from a strategy's `scorer` option: a Scorer object, "self", or a reward model spec.

    Reward models are loaded once per process and spec (loading a 7B PRM takes a while), and kept;
    `release_scorers()` frees them.
    """
    if isinstance(spec, Scorer):
        return spec
    if spec in (None, "", "self"):
        from thinktime.scorers.self_judge import SelfJudge

        return SelfJudge(ctx, judges=judges, max_tokens=judge_tokens, partial=partial)
    from thinktime.scorers.reward_models import load_reward_model, parse_spec

    parse_spec(spec)  # a bad spec fails before any loading
    key = (spec, ctx.engine.device)
    with _loading:
        if key not in _loaded:
            _loaded[key] = load_reward_model(spec, device=ctx.engine.device)
        return _loaded[key]


def release_scorers() -> None:
    with _loading:
        for scorer in _loaded.values():
            scorer.close()
        _loaded.clear()


__all__ = ["AGGREGATES", "Scorer", "aggregate", "make_scorer", "release_scorers"]
