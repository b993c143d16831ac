"""The STaR filter: grade sampled rationales, keep the correct ones, pair correct with incorrect.

A rationale is kept when its extracted answer (the last \\boxed{}, else the marked fallbacks
"the answer is X" and the last number) is graded correct against the gold answer, and the model
ended it itself (finish reason "stop": a chain cut off at the token limit would teach the model
to ramble). Duplicates (same text up to whitespace) count once; at most `keep` per problem, in
sample order. A rationalised rationale (sampled with the hint) must also not quote the hint.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thinktime.bootstrap.hints import quotes_hint
from thinktime.evaluation.grading import grade


@dataclass(frozen=True)
class Sample:
    """One sampled rationale, graded."""

    text: str
    answer: str | None
    finish_reason: str
    correct: bool
    tokens: int = 0

    @property
    def usable(self) -> bool:
        return self.correct and self.finish_reason == "stop" and bool(self.text.strip())


def grade_texts(texts: Sequence[str], gold: str, finish_reasons: Sequence[str] | None = None,
                tokens: Sequence[int] | None = None) -> list[Sample]:
    """Extract and grade each rationale's answer, as the strategies and the eval harness do."""
    from thinktime.strategies.base import to_candidate
    from thinktime.types import Completion

    finish_reasons = finish_reasons or ["stop"] * len(texts)
    tokens = tokens or [0] * len(texts)
    samples = []
    for text, finish, used in zip(texts, finish_reasons, tokens):
        candidate = to_candidate(Completion(text, finish, 0, used))
        samples.append(Sample(text, candidate.answer, finish, grade(candidate.answer, gold).correct, used))
    return samples


def _key(text: str) -> str:
    return " ".join(text.split())


def _distinct(samples: Sequence[Sample]) -> list[Sample]:
    seen: set[str] = set()
    out = []
    for s in samples:
        if _key(s.text) not in seen:
            seen.add(_key(s.text))
            out.append(s)
    return out


def keep_correct(samples: Sequence[Sample], keep: int) -> list[str]:
    """The STaR filter: up to `keep` distinct correct, finished rationales, in sample order."""
    return [s.text for s in _distinct([s for s in samples if s.usable])][:keep]


def keep_rationalised(samples: Sequence[Sample], gold: str, question: str, keep: int) -> tuple[list[str], int]:
    """Rationales sampled with the hint: the correct, finished ones that do not quote the hint.

    Returns the kept texts and how many correct, finished rationales were dropped for quoting it.
    """
    usable = _distinct([s for s in samples if s.usable])
    clean = [s.text for s in usable if not quotes_hint(s.text, gold, question)]
    return clean[:keep], len(usable) - len(clean)


def incorrect(samples: Sequence[Sample]) -> list[str]:
    """Distinct rationales with a wrong answer, finished ones first (the rejected side of pairs)."""
    wrong = _distinct([s for s in samples if not s.correct and s.text.strip()])
    return [s.text for s in sorted(wrong, key=lambda s: s.finish_reason != "stop")]


def make_pairs(chosen: Sequence[str], rejected: Sequence[str], max_pairs: int) -> list[tuple[str, str]]:
    """(correct, incorrect) pairs for one problem: every rationale used once before any repeats.

    max(len(chosen), len(rejected)) pairs, capped at `max_pairs`; pair i is
    (chosen[i % len(chosen)], rejected[i % len(rejected)]). None when either side is empty.
    """
    if not chosen or not rejected or max_pairs < 1:
        return []
    count = min(max_pairs, max(len(chosen), len(rejected)))
    return [(chosen[i % len(chosen)], rejected[i % len(rejected)]) for i in range(count)]
