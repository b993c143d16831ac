"""Label noise: how far two labellings of the same chains (two rollout seeds, K values or searches) agree.
Chains are matched by problem and step texts, so the two folders may hold them in any order."""
from __future__ import annotations

import math


def first_wrong(labels: list[bool]) -> int:
    """The index of the first step labelled wrong, or -1 when none is (ProcessBench's convention)."""
    return next((i for i, ok in enumerate(labels) if not ok), -1)


def _key(row: dict) -> tuple:
    return row["id"], tuple(row["completions"])


def _kappa(pairs: list[tuple[bool, bool]]) -> float | None:
    """Cohen's kappa: agreement beyond what two labellers with these label rates would reach by chance."""
    if not pairs:
        return None
    observed = sum(a == b for a, b in pairs) / len(pairs)
    pa, pb = sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)
    chance = pa * pb + (1 - pa) * (1 - pb)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return None if sx == 0 or sy == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def _measured(row: dict) -> list[bool]:
    return row.get("measured") or [True] * len(row["labels"])


def compare_labels(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Agreement of two labellings over the chains both hold: hard labels on every step and on the steps both
    measured by rollouts (Cohen's kappa there too), soft labels (mean absolute difference, Pearson r), and the
    first wrong step of each chain."""
    by_key = {_key(r): r for r in rows_b}
    matched = [(a, by_key[_key(a)]) for a in rows_a if _key(a) in by_key]
    every = [(x, y) for a, b in matched for x, y in zip(a["labels"], b["labels"])]
    rolled = [(i, a, b) for a, b in matched for i, (ma, mb) in enumerate(zip(_measured(a), _measured(b)))
              if ma and mb]
    hard = [(a["labels"][i], b["labels"][i]) for i, a, b in rolled]
    soft = [(a["soft_labels"][i], b["soft_labels"][i]) for i, a, b in rolled if "soft_labels" in a and
            "soft_labels" in b]
    return {
        "chains": len(matched), "only_a": len(rows_a) - len(matched), "only_b": len(rows_b) - len(matched),
        "steps": len(every), "steps_correct_a": _share([x for x, _ in every]),
        "steps_correct_b": _share([y for _, y in every]),
        "hard_agreement": _share([x == y for x, y in every]),
        "rolled_steps": len(hard), "rolled_hard_agreement": _share([x == y for x, y in hard]),
        "rolled_kappa": _kappa(hard),
        "soft_mean_abs_diff": _mean([abs(x - y) for x, y in soft]),
        "soft_pearson": _pearson([x for x, _ in soft], [y for _, y in soft]),
        "first_wrong_agreement": _share([first_wrong(a["labels"]) == first_wrong(b["labels"]) for a, b in matched]),
    }


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def label_statistics(rows: list[dict]) -> dict:
    """What a labelling found: chains, steps, the share of steps labelled right, chains with a wrong step."""
    steps = [x for r in rows for x in r["labels"]]
    rolled = sum(sum(_measured(r)) for r in rows)
    return {"chains": len(rows), "steps": len(steps), "steps_per_chain": _mean([len(r["labels"]) for r in rows]),
            "steps_correct": _share(steps), "chains_correct": _share([bool(r.get("correct")) for r in rows]),
            "chains_with_wrong_step": _share([first_wrong(r["labels"]) >= 0 for r in rows]),
            "rolled_out_prefixes": rolled, "tokens": sum(int(r.get("tokens", 0)) for r in rows),
            "seconds": sum(float(r.get("seconds", 0)) for r in rows)}
