"""The resumable eval loop: problems in, one graded record per problem out, written as it finishes.

Two paths:
- cot and self-consistency with an n-list (1,4,16): sample once at the largest n, then derive
  every smaller n from the first k of the same samples (maj@k by thinktime.voting; pass@k in the
  report). Several problems share one engine call when n is small.
- any other strategy in thinktime.strategies, and self-consistency given options (`round` for adaptive
  consistency, the confidence rules, `probe`): run it through the registry with a Context from
  Thinker.context, once per value in the list, each run graded on its own. The list sets the
  strategy's own size knob (SCALE_OPTION: best-of-n's n, reflect's rounds, budget's max_tokens,
  beam's width, mcts's iterations), or the option named by `scale_option`.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from thinktime.errors import BadInputError
from thinktime.evaluation.datasets import Dataset, Problem
from thinktime.evaluation.grading import GRADER_VERSION, Verdict, grade
from thinktime.evaluation.records import base_record as _base_record
from thinktime.evaluation.records import candidate_record as _candidate_record
from thinktime.evaluation.records import problem_seed
from thinktime.evaluation.store import RunStore
from thinktime.sampling import DEFAULT_SAMPLING_TEMPERATURE
from thinktime.strategies import SCALE_OPTION, STRATEGY_ALIASES

# The n-list path's strategies, by name or alias (sample once, vote every smaller n from the same chains).
SAMPLED = {name: STRATEGY_ALIASES.get(name, name) for name in ("cot", "self-consistency", *STRATEGY_ALIASES)
           if STRATEGY_ALIASES.get(name, name) in ("cot", "self-consistency")}


@dataclass
class Settings:
    strategy: str = "cot"
    ns: list[int] = field(default_factory=lambda: [1])
    seed: int = 0
    batch_problems: int | None = None  # problems per engine call on the n-list path (default: 8 rows)
    options: dict[str, Any] = field(default_factory=dict)  # strategy options for registry strategies
    budget_tokens: int | None = None
    save_text: bool = True
    scale_option: str | None = None  # registry strategies: the option -n sets (default SCALE_OPTION)

    def __post_init__(self):
        if self.options and self.strategy in SAMPLED:  # options (round, weights, probe): the registry's, once per n
            self.strategy = SAMPLED[self.strategy]

    @property
    def sampled(self) -> bool:
        """The n-list path: sample the largest n once, vote every smaller n from the same chains."""
        return self.strategy in SAMPLED and not self.options

    @property
    def max_n(self) -> int:
        return max(self.ns)

    @property
    def scale(self) -> str | None:
        """The strategy option that -n sets (None on the n-list path)."""
        if self.sampled:
            return None
        return self.scale_option or SCALE_OPTION.get(self.strategy)

    def strategy_options(self, k: int) -> dict[str, Any]:
        if self.scale is None:
            if self.ns != [1]:
                raise BadInputError(f"strategy {self.strategy!r} has no size option for -n to set",
                                    hint="pass --scale-option NAME, or use -n 1")
            return dict(self.options)
        return {**self.options, self.scale: k}


def parse_ns(text: str | Sequence[int]) -> list[int]:
    """`1,4,16` -> [1, 4, 16] (sorted, unique, each >= 1)."""
    try:
        values = [int(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise BadInputError(f"bad -n {text!r}", hint="give sample counts as a comma list, e.g. -n 1,4,16")
    return sorted(set(values))


def build_config(thinker, dataset: Dataset, settings: Settings) -> dict[str, Any]:
    """Everything that changes a record; its hash guards the run folder. --limit is not in it."""
    engine = thinker.engine
    params = thinker.sampling()
    probe = "|".join(m["content"] for q in ("1+1=?", "一加一等于几?") for m in thinker.messages(q)[:-1])
    return {
        "model": thinker.model_name,
        "engine": getattr(engine, "name", type(engine).__name__),
        "dtype": str(getattr(engine, "dtype", "")),
        "dataset": dataset.name,
        "split": dataset.split,
        "dataset_fingerprint": dataset.fingerprint,
        "strategy": SAMPLED.get(settings.strategy, settings.strategy),
        "n": list(settings.ns),
        "seed": settings.seed,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "system_prompt_sha": hashlib.sha256(probe.encode()).hexdigest()[:12],
        "lang": thinker.lang,
        "options": settings.options,
        "scale_option": settings.scale,
        "budget_tokens": settings.budget_tokens,
        "grader": GRADER_VERSION,
    }


def check_settings(settings: Settings, temperature: float) -> None:
    """Refuse what cannot work, before any model loads."""
    from thinktime.strategies import check_options, get_strategy

    if not settings.sampled:
        get_strategy(settings.strategy)  # a clear error for an unknown name, before any work
        for k in settings.ns:
            check_options(settings.strategy, settings.strategy_options(k))
    elif settings.budget_tokens is not None:
        raise BadInputError(f"--budget-tokens does not apply to {settings.strategy} with an n-list",
                            hint="cap each chain with --max-new-tokens instead")
    if settings.max_n > 1 and temperature <= 0 and settings.sampled:
        raise BadInputError(f"-n {settings.max_n} with greedy decoding draws {settings.max_n} identical chains",
                            hint=f"sample with --temperature > 0 (e.g. {DEFAULT_SAMPLING_TEMPERATURE}), or use -n 1")


def _sampled_records(thinker, chunk: list[Problem], settings: Settings) -> list[dict]:
    from thinktime.strategies.base import to_candidate
    from thinktime.strategies.cot import generate_batch
    from thinktime.voting import majority, vote_answers

    contexts = [thinker.context(p.question) for p in chunk]
    started = time.perf_counter()
    # Each problem draws from its own seed, so its samples do not depend on which problems share its call
    # (--limit, --batch-problems, or where a resumed run starts).
    outputs = generate_batch(contexts, n=settings.max_n, seeds=[problem_seed(settings.seed, p.id) for p in chunk])
    if outputs is None:  # only a Thinker made with budget_tokens caps the chains here
        raise BadInputError(f"the thinker's budget_tokens leaves no room for {settings.max_n} chains",
                            hint="make the Thinker without budget_tokens for an n-list run")
    generation = time.perf_counter() - started
    chunk_tokens = sum(c.completion_tokens for completions in outputs for c in completions) or 1
    records = []
    for problem, completions in zip(chunk, outputs):
        grading_started = time.perf_counter()
        candidates = [to_candidate(c) for c in completions]
        verdicts = [grade(c.answer, problem.gold) for c in candidates]
        by_k = {}
        for k in settings.ns:
            group = majority(vote_answers(candidates[:k]))  # the self-consistency strategy's vote
            verdict = verdicts[group.members[0]] if group else Verdict(False, False)
            by_k[str(k)] = {"answer": group.answer if group else None, "votes": int(group.weight) if group else 0,
                            "correct": verdict.correct, "simple": verdict.simple,
                            "tokens": sum(c.usage.completion_tokens for c in candidates[:k])}
        tokens = sum(c.completion_tokens for c in completions)
        top = by_k[str(settings.max_n)]
        records.append({
            **_base_record(problem),
            "candidates": [_candidate_record(c, v, settings.save_text) for c, v in zip(candidates, verdicts)],
            "by_k": by_k,
            "chosen": top["answer"], "correct": top["correct"], "simple": top["simple"],
            "prompt_tokens": completions[0].prompt_tokens if completions else 0,
            "completion_tokens": tokens,
            # one engine call served the chunk: each problem is charged its share of the tokens
            "seconds": round(generation * tokens / chunk_tokens + time.perf_counter() - grading_started, 4),
            "batch": len(chunk),
        })
    return records


def _strategy_record(thinker, problem: Problem, settings: Settings) -> dict:
    from thinktime.strategies import get_strategy

    strategy = get_strategy(settings.strategy)
    by_k, candidates, seconds, prompt_tokens, tokens = {}, [], 0.0, 0, 0
    for k in settings.ns:
        ctx = thinker.context(problem.question, strategy=settings.strategy, budget_tokens=settings.budget_tokens,
                              options=settings.strategy_options(k), seed=problem_seed(settings.seed, problem.id))
        started = time.perf_counter()
        result = strategy(ctx)
        spent = time.perf_counter() - started
        verdict = grade(result.answer, problem.gold)
        by_k[str(k)] = {"answer": result.answer, "correct": verdict.correct, "simple": verdict.simple,
                        "tokens": result.usage.completion_tokens, "seconds": round(spent, 4),
                        "candidates": len(result.candidates)}
        seconds += spent
        prompt_tokens += result.usage.prompt_tokens
        tokens += result.usage.completion_tokens
        if k == settings.max_n:
            candidates = [_candidate_record(c, grade(c.answer, problem.gold), settings.save_text)
                          for c in result.candidates]
    top = by_k[str(settings.max_n)]
    return {**_base_record(problem), "candidates": candidates, "by_k": by_k, "chosen": top["answer"],
            "correct": top["correct"], "simple": top["simple"], "prompt_tokens": prompt_tokens,
            "completion_tokens": tokens, "seconds": round(seconds, 4), "batch": 1}


def run_eval(thinker, dataset: Dataset, store: RunStore, settings: Settings,
             on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Evaluate every problem of `dataset` not yet in `store`; returns all the run's records."""
    check_settings(settings, thinker.temperature)
    pending = [p for p in dataset.problems if p.id not in store.done]
    if settings.strategy == "allocation":  # one budget per batch of problems
        from thinktime.evaluation.allocated import run_allocated

        run_allocated(thinker, dataset, store, settings, on_record)
    elif settings.sampled:
        per_call = settings.batch_problems or max(1, 8 // settings.max_n)
        for start in range(0, len(pending), per_call):
            for record in _sampled_records(thinker, pending[start : start + per_call], settings):
                store.append(record)
                if on_record:
                    on_record(record)
    else:
        for problem in pending:
            record = _strategy_record(thinker, problem, settings)
            store.append(record)
            if on_record:
                on_record(record)
    wanted = {p.id for p in dataset.problems}
    return [r for r in store.records if r["id"] in wanted]
