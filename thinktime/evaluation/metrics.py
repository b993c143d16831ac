"""The statistics a report needs: Wilson intervals, the unbiased pass@k, and matching token budgets."""
from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% by default); (0, 0) when there is no data."""
    if total <= 0:
        return 0.0, 0.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn from n (c of them correct) is correct.

    The unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product.
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def best_within_budget(points: Sequence[tuple[float, float]], budget: float) -> float | None:
    """The best accuracy among (tokens, accuracy) points that spend at most `budget` tokens."""
    inside = [acc for tokens, acc in points if tokens <= budget * (1 + 1e-9)]
    return max(inside) if inside else None
