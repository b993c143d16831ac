"""How sure a chain is of itself, from its tokens' log-probabilities (DeepConf, Fu et al. 2025).

A token's confidence is the negative mean log-probability of the model's top-k candidates at that
step: high where the model's mass sits on a few tokens, low where it hesitates. A chain's group
confidences are the means over sliding windows of `window` tokens; its lowest group confidence
(the weakest stretch of reasoning) is what ranks, weights and stops chains, as DeepConf does.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence


def token_confidence(top: Sequence[tuple[int, str, float]]) -> float:
    """-mean of the top-k log-probabilities at one step (0 where none were returned)."""
    return -sum(lp for _, _, lp in top) / len(top) if top else 0.0


def lowest_group_confidence(logprobs, window: int) -> float | None:
    """The lowest mean token confidence over any `window` consecutive tokens (the whole chain when shorter);
    None for a chain without log-probabilities."""
    if not logprobs:
        return None
    return lowest_mean([token_confidence(entry.top) for entry in logprobs], window)


def lowest_mean(values: Sequence[float], window: int) -> float:
    """The lowest mean of any `window` consecutive values (of all of them when there are fewer)."""
    if len(values) <= window:
        return sum(values) / len(values)
    total = sum(values[:window])
    lowest = total
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        lowest = min(lowest, total)
    return lowest / window


class RunningGroup:
    """The mean token confidence of the last `window` tokens, as a chain is generated (for stopping it)."""

    def __init__(self, window: int):
        self.window = window
        self.values: deque[float] = deque()
        self.total = 0.0

    def push(self, top: Sequence[tuple[int, str, float]]) -> float | None:
        """Add a token; the window's mean once it is full, else None."""
        value = token_confidence(top)
        self.values.append(value)
        self.total += value
        if len(self.values) > self.window:
            self.total -= self.values.popleft()
        return self.total / self.window if len(self.values) == self.window else None


def threshold(confidences: Sequence[float], keep: float) -> float:
    """The confidence that the top `keep` share of these chains reach: DeepConf's stopping threshold learnt from
    its warm-up chains (keep 0.1: the 90th percentile, keep 0.9: the 10th)."""
    ordered = sorted(confidences)
    position = (1.0 - keep) * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
