"""The adaptive rules through `thinktime eval`: `-s allocation` (the problems of a batch share one token budget;
records per problem, a resumed run forms the batches an unbroken one would, the report reads tokens per problem)
and self-consistency with options (adaptive consistency, confidence rules, probing) through the registry."""
from __future__ import annotations

import json

import pytest

from thinktime import Thinker
from thinktime.errors import BadInputError
from thinktime.evaluation.datasets import load_dataset
from thinktime.evaluation.report import summarize
from thinktime.evaluation.runner import Settings, build_config, check_settings, run_eval
from thinktime.evaluation.store import RECORDS, RunStore

OPTIONS = {"first": 2, "step": 2, "most": 4}


def evaluate(thinker, data, settings, folder):
    with RunStore(folder, build_config(thinker, data, settings)) as store:
        return run_eval(thinker, data, store, settings)


def test_a_batch_of_problems_spends_one_budget_and_resumes_by_batch(engine, tmp_path):
    thinker = Thinker(engine=engine, max_new_tokens=12, think=False)
    data = load_dataset("arith:1", limit=4)
    settings = Settings("allocation", [30, 60], seed=2, batch_problems=2, options=OPTIONS)
    records = evaluate(thinker, data, settings, tmp_path / "run")
    assert [r["id"] for r in records] == [p.id for p in data.problems]
    for batch in (records[:2], records[2:]):
        for k in (30, 60):
            spent = sum(r["by_k"][str(k)]["tokens"] for r in batch)
            assert 0 < spent <= k * len(batch) and all(r["by_k"][str(k)]["batch_tokens"] == spent for r in batch)
            assert all(2 <= r["by_k"][str(k)]["candidates"] <= 4 for r in batch)
    for r in records:
        assert r["chosen"] == r["by_k"]["60"]["answer"] and len(r["candidates"]) == r["by_k"]["60"]["candidates"]
        assert r["completion_tokens"] == r["by_k"]["30"]["tokens"] + r["by_k"]["60"]["tokens"]
    summary = summarize(tmp_path / "run")  # the report: accuracy against tokens per problem, per budget
    assert [p.avg_tokens for p in summary.points] == pytest.approx(
        [sum(r["by_k"][k]["tokens"] for r in records) / 4 for k in ("30", "60")])

    # killed during the second batch: it is redone whole, as the batch an unbroken run formed
    lines = (tmp_path / "run" / RECORDS).read_text().splitlines()
    (tmp_path / "run" / RECORDS).write_text("\n".join(lines[:2]) + "\n")
    resumed = evaluate(thinker, data, settings, tmp_path / "run")
    assert [json.dumps(r, sort_keys=True) for r in resumed[:2]] == [json.dumps(r, sort_keys=True)
                                                                     for r in records[:2]]
    assert [timeless(r) for r in resumed[2:]] == [timeless(r) for r in records[2:]]  # the same batch again
    (tmp_path / "run" / RECORDS).write_text("\n".join(lines[:3]) + "\n")  # a batch found partly written
    rest = evaluate(thinker, data, settings, tmp_path / "run")
    assert [r["id"] for r in rest] == [p.id for p in data.problems] and rest[3]["batch"] == 1


def timeless(record: dict) -> dict:
    """A record without its wall times (all else is reproducible)."""
    by_k = {k: {f: v for f, v in row.items() if f != "seconds"} for k, row in record["by_k"].items()}
    return {**{k: v for k, v in record.items() if k != "seconds"}, "by_k": by_k}


def test_allocation_settings_are_checked_before_any_model_loads():
    check_settings(Settings("allocation", [500], options={"first": 2}), 0.0)
    with pytest.raises(BadInputError, match="no option 'n'"):
        check_settings(Settings("allocation", [500], options={"n": 4}), 0.0)
    with pytest.raises(BadInputError):
        check_settings(Settings("allocation", [0]), 0.0)


def test_self_consistency_with_options_runs_through_the_registry_once_per_n(llama_engine, tmp_path):
    settings = Settings("sc", [2, 4], seed=1, options={"round": 2, "weights": "confidence", "window": 4})
    assert not settings.sampled and settings.strategy == "self-consistency"
    assert settings.strategy_options(4) == {"round": 2, "weights": "confidence", "window": 4, "n": 4}
    thinker = Thinker(engine=llama_engine, max_new_tokens=12, think=False)
    data = load_dataset("arith:1", limit=2)
    records = evaluate(thinker, data, settings, tmp_path / "run")
    for r in records:
        assert r["by_k"]["2"]["candidates"] == 2 and 2 <= r["by_k"]["4"]["candidates"] <= 4  # rounds may stop early
        assert r["completion_tokens"] == r["by_k"]["2"]["tokens"] + r["by_k"]["4"]["tokens"]
    summary = summarize(tmp_path / "run")
    assert summary.config["options"] == settings.options
    # pass@4 only where every problem drew 4 chains: an early stop leaves no unbiased estimate
    drew_all = all(len(r["candidates"]) >= 4 for r in records)
    assert (summary.points[1].pass_at_k is not None) == drew_all
