"""A tiny end-to-end STaR run on the embedded model: evaluate, sample + filter + rationalise, fine-tune
(a real TRL step), load the new model folder back, evaluate again, train the ORM, compare, plot."""
from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from thinktime.bootstrap.loop import BootstrapConfig, run_bootstrap
    from thinktime.bootstrap.rounds import RoundSettings
    from thinktime.bootstrap.training import TrainSettings

    out = tmp_path_factory.mktemp("star") / "run"
    tiny = dict(max_steps=1, batch_size=2, max_length=640)
    config = BootstrapConfig(
        model="smollm2-135m", dataset="arith:1", rounds=1, output=str(out), train_problems=4, eval_problems=3,
        compare_n=2, sampling=RoundSettings(samples=3, max_new_tokens=64, keep=1, max_pairs=1, seed=0),
        training=TrainSettings(**tiny), reward_training=TrainSettings(**tiny))
    logs: list[str] = []
    summary = run_bootstrap(config, log=logs.append)
    return out, summary, logs, config


def test_rounds_are_evaluated_and_trained(run):
    out, summary, logs, _ = run
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for r in summary["rounds"]:
        ev = r["eval"]
        assert ev["total"] == 3 and 0 <= ev["correct"] <= 3 and ev["ci"][0] <= ev["accuracy"] <= ev["ci"][1]
    round1 = summary["rounds"][1]
    assert round1["model"] == str(out / "round-1" / "model")  # evaluated through the engine from the folder
    assert round1["train"]["steps"] == 1 and round1["train"]["method"] == "sft"
    records = [json.loads(line) for line in (out / "round-1" / "eval" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert (out / "accuracy.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["rounds"][1]["eval"] == round1["eval"]
    assert any("held-out accuracy" in line for line in logs)


def test_round_data_and_statistics(run):
    from datasets import load_dataset

    out, summary, _, config = run
    stats = summary["rounds"][1]["data"]
    assert stats["problems"] == 4 and stats["samples"] == 12
    assert 0 <= stats["correct_samples"] <= 12 and stats["solved"] <= 4
    # keep=1: a rationale per problem at most; beyond the solved problems only chains cut off by the
    # token limit after deriving the gold answer (kept trimmed)
    assert stats["kept"] <= stats["problems"] and stats["kept"] - stats["trimmed"] <= stats["solved"]
    assert stats["kept_problems"] == stats["kept"]  # keep=1
    assert stats["sft_rows"] == stats["kept"] + stats["rationalised"] >= 1
    sft = load_dataset("json", data_files=str(out / "round-1" / "sft.jsonl"), split="train")
    assert len(sft) == stats["sft_rows"]
    system = sft[0]["messages"][0]
    assert system["role"] == "system" and "{max_tokens}" not in system["content"] and len(system["content"]) > 200
    for row in sft:
        user = row["messages"][1]["content"]
        assert user.startswith("What is") and "hint" not in user.lower()  # the hint never reaches the data
        assert row["kind"] in ("correct", "rationalised")
    samples = [json.loads(line) for line in (out / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(r["samples"]) == 3 for r in samples)
    assert sum(s["correct"] for r in samples for s in r["samples"]) == stats["correct_samples"]
    assert all(len(r["hinted"]) in (0, 2) for r in samples)  # hint_samples=2, only for the failed problems
    pairs_file = out / "round-1" / "pairs.jsonl"
    assert sum(1 for _ in pairs_file.open()) == stats["pairs"]
    if stats["pairs"]:
        pairs = load_dataset("json", data_files=str(pairs_file), split="train")
        assert pairs[0]["chosen"][0]["content"] != pairs[0]["rejected"][0]["content"]


def test_reward_model_comparison(run):
    out, summary, _, _ = run
    rm = summary["reward_model"]
    if "skipped" in rm:
        pytest.skip(rm["skipped"])
    assert rm["n"] == 2 and rm["problems"] == 3
    assert rm["pass"]["correct"] <= 3
    for key in ("majority", "best_of_n", "weighted", "first_sample"):
        assert 0 <= rm[key]["correct"] <= rm["pass"]["correct"]  # no selection beats "some sample is right"
    assert (out / "reward-model" / "config.json").is_file()


def test_resume_reuses_everything(run):
    from thinktime.bootstrap.loop import run_bootstrap

    out, summary, _, config = run
    mtime = (out / "round-1" / "model" / "model.safetensors").stat().st_mtime
    again = run_bootstrap(config, log=lambda m: None)
    assert [r["eval"] for r in again["rounds"]] == [r["eval"] for r in summary["rounds"]]
    assert (out / "round-1" / "model" / "model.safetensors").stat().st_mtime == mtime


def test_trained_rounds_sample_on_llamacpp_when_written_as_gguf(tmp_path):
    """--engine auto with --gguf: the embedded model and each trained model run on llama.cpp."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'thinktime[llamacpp]'")
    from thinktime.bootstrap.loop import BootstrapConfig, run_bootstrap
    from thinktime.bootstrap.rounds import RoundSettings
    from thinktime.bootstrap.training import TrainSettings

    out = tmp_path / "run"
    short = "Solve the problem step by step, then give the final answer as \\boxed{N}."
    config = BootstrapConfig(
        model="smollm2-135m", dataset="arith:1", rounds=1, output=str(out), train_problems=3, eval_problems=2,
        engine="auto", gguf="q8_0", sampling=RoundSettings(samples=2, max_new_tokens=32, keep=1, max_pairs=1, seed=0),
        training=TrainSettings(max_steps=1, batch_size=2, max_length=640), system_prompt=short)
    logs: list[str] = []
    summary = run_bootstrap(config, log=logs.append)
    assert (out / "round-1" / "model" / "model.gguf").is_file()
    # the run's own system prompt, not the thinking prompt, in every SFT row and both held-out evaluations
    rows = [json.loads(line) for line in (out / "round-1" / "sft.jsonl").read_text().splitlines()]
    assert rows and all(row["messages"][0] == {"role": "system", "content": short} for row in rows)
    shas = {json.loads((out / f"round-{r}" / "eval" / "config.json").read_text())["config"]["system_prompt_sha"]
            for r in (0, 1)}
    assert shas == {hashlib.sha256(f"{short}|{short}".encode()).hexdigest()[:12]}  # as eval hashes it, per language
    assert any("round 0:" in line and "llamacpp engine" in line for line in logs)
    assert any("round 1:" in line and "llamacpp engine" in line for line in logs)
    assert summary["rounds"][1]["eval"]["total"] == 2
    with pytest.raises(Exception, match="unknown --gguf"):
        run_bootstrap(BootstrapConfig(model="smollm2-135m", output=str(tmp_path / "other"), gguf="q3"), log=logs.append)
