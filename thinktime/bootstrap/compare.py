"""Best-of-n with the trained outcome reward model against majority voting, at the same N.

Both see the *same* N samples per held-out problem (one self-consistency eval run of the
evaluation harness, texts kept), so the comparison isolates the selection rule:

    maj@N        majority over math-equivalent answers (thinktime.voting; ties: first sampled)
    best-of-N    the chain the ORM scores highest (ties: first sampled), exactly as the best-of-n
                 strategy picks with `scorer=orm:PATH` (same scorer object, same step split)
    weighted@N   ORM scores summed per answer (best-of-n's select=weighted)
    pass@N       some sample is right (the ceiling of any selection rule)

It reports each accuracy with its 95% Wilson interval, and the problems on which best-of-N and
maj@N disagree in correctness (each side's wins), whatever the outcome.
"""
from __future__ import annotations

import math
from pathlib import Path


def compare_selection(records: list[dict], scores: list[list[float]], n: int) -> dict:
    """Accuracies of the selection rules on eval records (candidates with 'correct', 'answer')."""
    from thinktime.evaluation.metrics import wilson
    from thinktime.voting import group_answers

    wins = {"best_of_n": 0, "majority": 0}
    totals = {"majority": 0, "best_of_n": 0, "weighted": 0, "pass": 0, "first_sample": 0}
    for record, chain_scores in zip(records, scores):
        candidates = record["candidates"][:n]
        chain_scores = chain_scores[:n]
        maj = bool(record["by_k"][str(n)]["correct"])
        best = max(range(len(candidates)), key=lambda i: (chain_scores[i], -i))
        bon = bool(candidates[best]["correct"])
        groups = group_answers([c["answer"] for c in candidates], chain_scores)
        weighted = bool(groups and candidates[max(groups[0].members, key=lambda i: (chain_scores[i], -i))]["correct"])
        totals["majority"] += maj
        totals["best_of_n"] += bon
        totals["weighted"] += weighted
        totals["pass"] += any(c["correct"] for c in candidates)
        totals["first_sample"] += bool(candidates and candidates[0]["correct"])
        wins["best_of_n"] += bon and not maj
        wins["majority"] += maj and not bon
    total = len(records)
    result = {"n": n, "problems": total, "disagreements": wins}
    for key, correct in totals.items():
        lo, hi = wilson(correct, total)
        result[key] = {"correct": correct, "accuracy": correct / total if total else 0.0,
                       "ci": [round(lo, 4), round(hi, 4)]}
    # exact two-sided sign test (McNemar) on the discordant problems
    b, c = wins["best_of_n"], wins["majority"]
    k, m = min(b, c), b + c
    result["sign_test_p"] = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    return result


def sample_heldout(thinker, heldout, n: int, folder: str | Path, seed: int = 0) -> list[dict]:
    """N sampled chains per held-out problem, texts kept: a resumable self-consistency eval run."""
    from thinktime.evaluation.runner import Settings, build_config, run_eval
    from thinktime.evaluation.store import RunStore

    settings = Settings(strategy="self-consistency", ns=sorted({1, n}), seed=seed, save_text=True)
    with RunStore(folder, build_config(thinker, heldout, settings)) as store:
        return run_eval(thinker, heldout, store, settings)


def score_records(records: list[dict], reward_model: str | Path, n: int, device: str | None = None) -> list[list[float]]:
    """The ORM's score of each chain, through the same scorer and step split the best-of-n strategy uses."""
    from thinktime.scorers.reward_models import load_reward_model
    from thinktime.strategies.steps import DEFAULT_DELIMITER, split_steps

    scorer = load_reward_model(f"orm:{reward_model}", device=device)
    try:
        scores = []
        for record in records:
            chains = [split_steps(c["text"], DEFAULT_DELIMITER) or [c["text"]] for c in record["candidates"][:n]]
            scores.append([s[-1] for s in scorer.score(record["question"], chains)])
        return scores
    finally:
        scorer.close()


def compare_reward_model(records: list[dict], reward_model: str | Path, n: int, device: str | None = None) -> dict:
    """Best-of-N with the ORM at `reward_model` against maj@N on the same sampled records."""
    result = compare_selection(records, score_records(records, reward_model, n, device), n)
    result["reward_model"] = str(reward_model)
    return result
