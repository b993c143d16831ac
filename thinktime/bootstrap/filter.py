"""The STaR filter: grade sampled rationales, keep the correct ones, pair correct with incorrect.

A rationale is kept when its extracted answer (the last \\boxed{}, else the marked fallbacks
"the answer is X" and the last number) is graded correct against the gold answer and the model
ended it itself (finish reason "stop"). A chain cut off at the token limit is kept only when it had
already derived the gold answer ("... = 85", see hints.first_derivation): it is trimmed after the
sentence that derives it, and the trimmed text must grade correct on its own (small models derive
the answer, then ramble on until the limit; the trimmed chain teaches them to stop at the answer).
Duplicates (same text up to whitespace) count once; at most `keep` per problem, in sample order.
A rationalised rationale (sampled with the hint) must also not quote the hint.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thinktime.bootstrap.hints import quotes_hint, trim_after_derivation
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


def _grade_one(text: str, finish: str, used: int, gold: str) -> Sample:
    from thinktime.strategies.base import to_candidate
    from thinktime.types import Completion

    candidate = to_candidate(Completion(text, finish, 0, used))
    return Sample(text, candidate.answer, finish, grade(candidate.answer, gold).correct, used)


def grade_texts(texts: Sequence[str], gold: str, finish_reasons: Sequence[str] | None = None,
                tokens: Sequence[int] | None = None) -> list[Sample]:
    """Extract and grade each rationale's answer, as the strategies and the eval harness do."""
    finish_reasons = finish_reasons or ["stop"] * len(texts)
    tokens = tokens or [0] * len(texts)
    return [_grade_one(text, finish, used, gold) for text, finish, used in zip(texts, finish_reasons, tokens)]


def training_text(sample: Sample, gold: str) -> str | None:
    """What to train on from one sample: a finished correct chain as it is; a chain cut off by the
    token limit, trimmed after the sentence that first derives the gold answer, when that trimmed
    text grades correct by itself; otherwise nothing."""
    if not sample.text.strip():
        return None
    if sample.finish_reason == "stop":
        return sample.text if sample.correct else None
    if sample.finish_reason != "length":
        return None  # cancelled
    trimmed = trim_after_derivation(sample.text, gold)
    if trimmed and _grade_one(trimmed, "stop", 0, gold).correct:
        return trimmed
    return None


def _distinct_texts(texts) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in texts:
        if t is not None and _key(t) not in seen:
            seen.add(_key(t))
            out.append(t)
    return out


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


def keep_correct(samples: Sequence[Sample], gold: str, keep: int) -> list[str]:
    """The STaR filter: up to `keep` distinct correct rationales (see training_text), in sample order."""
    return _distinct_texts(training_text(s, gold) for s in samples)[:keep]


def keep_rationalised(samples: Sequence[Sample], gold: str, question: str, keep: int) -> tuple[list[str], int]:
    """Rationales sampled with the hint: the correct ones (see training_text) that do not quote it.

    Returns the kept texts and how many correct rationales were dropped for quoting the hint.
    """
    usable = _distinct_texts(training_text(s, gold) for s in samples)
    clean = [t for t in usable if not quotes_hint(t, gold, question)]
    return clean[:keep], len(usable) - len(clean)


def incorrect(samples: Sequence[Sample], gold: str) -> list[str]:
    """Distinct rationales with a wrong answer that nothing was kept from, finished ones first
    (the rejected side of pairs)."""
    wrong = _distinct([s for s in samples if not s.correct and s.text.strip() and training_text(s, gold) is None])
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
