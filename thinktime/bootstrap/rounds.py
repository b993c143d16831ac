"""One STaR round over the training problems, through any engine.

1. Sample K rationales per problem (one batched `Engine.generate` per chunk of problems).
2. Keep the correct ones (the STaR filter, thinktime.bootstrap.filter).
3. Rationalise the problems with no kept rationale: sample again with the gold answer as a hint
   (thinktime.bootstrap.hints) and keep what reaches it without quoting the hint.
4. SFT rows (plain question -> kept rationale) and preference pairs (a correct rationale against
   an incorrect one for the same problem; rationalised ones may be the correct side).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from thinktime.bootstrap import data
from thinktime.bootstrap.filter import (Sample, grade_texts, incorrect, keep_correct, keep_rationalised,
                                        make_pairs)
from thinktime.bootstrap.hints import with_hint
from thinktime.evaluation.datasets import Problem
from thinktime.types import Prompt, SamplingParams


@dataclass
class RoundSettings:
    samples: int = 4  # K rationales per problem
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 320
    keep: int = 1  # kept rationales per problem (distinct)
    rationalise: bool = True
    hint_samples: int = 2  # rationales sampled with the hint per failed problem
    max_pairs: int = 2  # preference pairs per problem
    seed: int = 0
    chunk: int = 16  # problems per engine call


@dataclass
class RoundStats:
    round: int
    problems: int = 0
    samples: int = 0
    correct_samples: int = 0
    solved: int = 0  # problems with at least one correct sample (a finished chain whose answer is right)
    kept: int = 0  # rationales kept by the STaR filter
    kept_problems: int = 0  # problems with a kept rationale: the solved ones, and chains cut after deriving it
    trimmed: int = 0  # kept rationales (either kind) cut by the token limit, trimmed after their derivation
    rationalised_problems: int = 0  # problems rescued by rationalisation
    rationalised: int = 0  # rationales kept from hinted sampling
    quoted_hint: int = 0  # correct hinted rationales dropped for quoting the hint
    pairs: int = 0
    sft_rows: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def sample_accuracy(self) -> float:
        return self.correct_samples / self.samples if self.samples else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sample_accuracy"] = round(self.sample_accuracy, 4)
        d["pass_at_k"] = round(self.solved / self.problems, 4) if self.problems else 0.0
        d["seconds"] = round(self.seconds, 2)
        return d


@dataclass
class RoundResult:
    stats: RoundStats
    sft: list[dict]
    pairs: list[dict]
    samples: dict[str, list[Sample]]  # problem id -> its graded unhinted samples
    hinted: dict[str, list[Sample]] = field(default_factory=dict)  # problem id -> samples asked with the hint

    def sample_rows(self, problems: Sequence[Problem]) -> list[dict]:
        """Every sample of the round, graded (samples.jsonl): what the filter saw."""
        def rows(samples):
            return [{"text": s.text, "answer": s.answer, "correct": s.correct, "finish": s.finish_reason}
                    for s in samples]

        return [{"id": p.id, "question": p.question, "gold": p.gold, "samples": rows(self.samples.get(p.id, [])),
                 "hinted": rows(self.hinted.get(p.id, []))} for p in problems]


def _sample(engine, prompts: list[Prompt], settings: RoundSettings, n: int, seed: int,
            on_chunk: Callable[[int], None] | None) -> list[list]:
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p, n=n)
    out: list[list] = []
    for start in range(0, len(prompts), settings.chunk):
        chunk = prompts[start:start + settings.chunk]
        out.extend(engine.generate(chunk, replace(params, seed=seed + start)))
        if on_chunk:
            on_chunk(len(chunk))
    return out


def run_round(engine, messages: Callable[[str], list[dict]], problems: Sequence[Problem], settings: RoundSettings,
              round_index: int = 1, on_progress: Callable[[str, int], None] | None = None) -> RoundResult:
    """Sample, filter, rationalise and pair over `problems`; `messages(question)` builds the chat
    (deep-thinking system prompt + question), as Thinker.messages does."""
    started = time.perf_counter()
    stats = RoundStats(round=round_index, problems=len(problems))
    seed = settings.seed + 100_003 * round_index
    plain = [messages(p.question) for p in problems]
    outputs = _sample(engine, [Prompt.of(m) for m in plain], settings, settings.samples, seed,
                      on_progress and (lambda k: on_progress("sample", k)))
    graded, kept = _keep_correct(problems, outputs, settings, stats)
    failed = [p for p in problems if not kept[p.id]]
    rationalised: dict[str, list[str]] = {}
    hinted_samples: dict[str, list[Sample]] = {}
    if settings.rationalise and failed:
        rationalised, hinted_samples = _rationalise(engine, messages, failed, settings, seed + 50_000, stats,
                                                    on_progress and (lambda k: on_progress("rationalise", k)))
    sft, pairs = _training_rows(problems, plain, graded, kept, rationalised, settings, round_index)
    stats.sft_rows, stats.pairs = len(sft), len(pairs)
    stats.seconds = time.perf_counter() - started
    return RoundResult(stats, sft, pairs, graded, hinted_samples)


def _keep_correct(problems: Sequence[Problem], outputs: list[list], settings: RoundSettings,
                  stats: RoundStats) -> tuple[dict[str, list[Sample]], dict[str, list[str]]]:
    """Each problem's samples graded, and the distinct correct rationales kept (counted into `stats`)."""
    graded: dict[str, list[Sample]] = {}
    kept: dict[str, list[str]] = {}
    for problem, completions in zip(problems, outputs):
        samples = grade_texts([c.text for c in completions], problem.gold, [c.finish_reason for c in completions],
                              [c.completion_tokens for c in completions])
        graded[problem.id] = samples
        kept[problem.id] = keep_correct(samples, problem.gold, settings.keep)
        stats.samples += len(samples)
        stats.correct_samples += sum(s.correct for s in samples)
        stats.solved += any(s.usable for s in samples)  # a finished chain with the right answer
        stats.kept += len(kept[problem.id])
        stats.kept_problems += bool(kept[problem.id])
        stats.trimmed += sum(t not in {s.text for s in samples} for t in kept[problem.id])
        stats.completion_tokens += sum(c.completion_tokens for c in completions)
    return graded, kept


def _rationalise(engine, messages: Callable[[str], list[dict]], failed: list[Problem], settings: RoundSettings,
                 seed: int, stats: RoundStats, on_chunk: Callable[[int], None] | None
                 ) -> tuple[dict[str, list[str]], dict[str, list[Sample]]]:
    """The failed problems asked again with the gold answer as a hint; the rationales that derive it without
    quoting the hint, and every hinted sample."""
    from thinktime.prompts import detect_language

    hinted = [messages(with_hint(p.question, p.gold, detect_language(p.question))) for p in failed]
    outputs = _sample(engine, [Prompt.of(m) for m in hinted], settings, settings.hint_samples, seed, on_chunk)
    rationalised: dict[str, list[str]] = {}
    hinted_samples: dict[str, list[Sample]] = {}
    for problem, completions in zip(failed, outputs):
        samples = grade_texts([c.text for c in completions], problem.gold, [c.finish_reason for c in completions])
        hinted_samples[problem.id] = samples
        texts, quoted = keep_rationalised(samples, problem.gold, problem.question, settings.keep)
        stats.quoted_hint += quoted
        stats.completion_tokens += sum(c.completion_tokens for c in completions)
        if texts:
            stats.trimmed += sum(t not in {s.text for s in samples} for t in texts)
            rationalised[problem.id] = texts
            stats.rationalised_problems += 1
            stats.rationalised += len(texts)
    return rationalised, hinted_samples


def _training_rows(problems: Sequence[Problem], plain: list[list[dict]], graded: dict[str, list[Sample]],
                   kept: dict[str, list[str]], rationalised: dict[str, list[str]], settings: RoundSettings,
                   round_index: int) -> tuple[list[dict], list[dict]]:
    """SFT rows (kept, then rationalised rationales) and preference pairs (a chosen one against a wrong one)."""
    sft, pairs = [], []
    for problem, prompt in zip(problems, plain):
        for text in kept[problem.id]:
            sft.append(data.sft_row(prompt, text, id=problem.id, round=round_index, kind="correct"))
        for text in rationalised.get(problem.id, []):
            sft.append(data.sft_row(prompt, text, id=problem.id, round=round_index, kind="rationalised"))
        chosen = kept[problem.id] or rationalised.get(problem.id, [])
        for good, bad in make_pairs(chosen, incorrect(graded[problem.id], problem.gold), settings.max_pairs):
            pairs.append(data.pair_row(prompt, good, bad, id=problem.id, round=round_index))
    return sft, pairs
