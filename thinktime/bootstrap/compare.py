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

from pathlib import Path


def compare_selection(records: list[dict], scores: list[list[float]], n: int) -> dict:
    """Accuracies of the selection rules on eval records (candidates with 'correct', 'answer')."""
    from thinktime.evaluation.metrics import wilson
    from thinktime.evaluation.verifiers import paired, selections

    picked = selections(records, scores, n)
    against = paired(picked["best"], picked["maj"])
    total = len(records)
    result = {"n": n, "problems": total,
              "disagreements": {"best_of_n": against["wins"], "majority": against["losses"]},
              "sign_test_p": against["sign_test_p"]}
    for key, name in (("maj", "majority"), ("best", "best_of_n"), ("weighted", "weighted"), ("pass", "pass"),
                      ("first", "first_sample")):
        correct = sum(picked[key])
        lo, hi = wilson(correct, total)
        result[name] = {"correct": correct, "accuracy": correct / total if total else 0.0,
                        "ci": [round(lo, 4), round(hi, 4)]}
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
    from thinktime.evaluation.verifiers import score_chains
    from thinktime.scorers.reward_models import load_reward_model

    scorer = load_reward_model(f"orm:{reward_model}", device=device)
    try:
        return score_chains(records, scorer, "last", n)
    finally:
        scorer.close()


def compare_reward_model(records: list[dict], reward_model: str | Path, n: int, device: str | None = None) -> dict:
    """Best-of-N with the ORM at `reward_model` against maj@N on the same sampled records."""
    result = compare_selection(records, score_records(records, reward_model, n, device), n)
    result["reward_model"] = str(reward_model)
    return result
