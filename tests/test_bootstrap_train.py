"""`thinktime train sft|dpo|rm` through the real TRL trainers on the embedded model (one step each),
the written folders loaded back by the transformers engine and the ORM scorer, and the data files
read with `datasets`."""
from __future__ import annotations

import json
import math

import pytest

from thinktime.bootstrap import data
from thinktime.bootstrap.training import TRAIN_INFO, TrainSettings, cpu_has_bf16, train

pytest.importorskip("trl")
pytest.importorskip("peft")

SYSTEM = [{"role": "system", "content": "Think step by step, then give the answer."}]
PROBLEMS = [("What is 2 + 3?", "2 + 3 = 5. The answer is 5.", "2 + 3 = 6. The answer is 6."),
            ("What is 4 + 4?", "4 + 4 = 8. The answer is 8.", "4 + 4 = 9. The answer is 9."),
            ("What is 7 + 1?", "7 + 1 = 8. The answer is 8.", "I think it is 71."),
            ("What is 5 + 2?", "5 + 2 = 7. The answer is 7.", "5 + 2 = 52.")]
TINY = dict(max_steps=1, batch_size=2, max_length=128, seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bootstrap-data")
    sft = [data.sft_row(SYSTEM + [{"role": "user", "content": q}], good, id=f"p{i}", round=1, kind="correct")
           for i, (q, good, _) in enumerate(PROBLEMS)]
    pairs = [data.pair_row(SYSTEM + [{"role": "user", "content": q}], good, bad, id=f"p{i}", round=1)
             for i, (q, good, bad) in enumerate(PROBLEMS)]
    return data.write_jsonl(folder / "sft.jsonl", sft), data.write_jsonl(folder / "pairs.jsonl", pairs)


def test_files_load_with_datasets_in_trl_formats(files):
    from datasets import load_dataset

    sft = load_dataset("json", data_files=str(files[0]), split="train")
    assert len(sft) == 4 and "messages" in sft.column_names
    assert [m["role"] for m in sft[0]["messages"]] == ["system", "user", "assistant"]
    assert sft[0]["messages"][2]["content"] == PROBLEMS[0][1]
    pairs = load_dataset("json", data_files=str(files[1]), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)
    assert [m["role"] for m in pairs[0]["prompt"]] == ["system", "user"]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": PROBLEMS[0][1]}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": PROBLEMS[0][2]}]
    # what the trainers are handed
    from thinktime.bootstrap.training import load_rows

    rows = load_rows("sft", [files[0]])
    assert rows.column_names == ["prompt", "completion"] and rows[0]["completion"][0]["role"] == "assistant"
    rm_rows = load_rows("rm", [files[1]])
    assert [m["role"] for m in rm_rows[0]["prompt"]] == ["user"]  # the ORM scorer reads [user, assistant]


def test_sft_full_writes_a_model_the_engine_loads(files, tmp_path):
    from thinktime.engines.hf import TransformersEngine
    from thinktime.types import Prompt, SamplingParams

    out = tmp_path / "sft-model"
    info = train("sft", "smollm2-135m", [files[0]], out, TrainSettings(**TINY), log=lambda m: None)
    assert info["steps"] == 1 and math.isfinite(info["train_loss"]) and info["dtype"] == "float32"
    assert info["cpu_autocast_bf16"] == cpu_has_bf16()  # fp32 weights, bf16 products where the CPU has them
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file() and json.loads((out / TRAIN_INFO).read_text())["method"] == "sft"
    assert not list(tmp_path.glob(".*checkpoints"))  # the trainer's scratch folder is gone
    engine = TransformersEngine(str(out))
    [[completion]] = engine.generate([Prompt.of(SYSTEM + [{"role": "user", "content": "What is 2 + 3?"}])],
                                     SamplingParams(max_new_tokens=8))
    assert completion.completion_tokens > 0
    engine.close()


def test_dpo_lora_is_merged_into_a_plain_model(files, tmp_path):
    out = tmp_path / "dpo-model"
    info = train("dpo", "smollm2-135m", [files[1]], out, TrainSettings(lora=True, lora_r=4, lora_alpha=8, **TINY),
                 log=lambda m: None)
    assert info["steps"] == 1
    assert not (out / "adapter_config.json").exists()  # merged: any engine loads it without peft
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"][0].endswith("ForCausalLM")


def test_reward_model_scores_best_of_n(files, tmp_path):
    from thinktime import Thinker

    out = tmp_path / "orm"
    info = train("rm", "smollm2-135m", [files[1]], out, TrainSettings(**TINY), log=lambda m: None)
    assert info["steps"] == 1
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert len(config.get("id2label") or {}) == 1  # num_labels=1: one reward logit
    thinker = Thinker("smollm2-135m", max_new_tokens=12, seed=0)
    result = thinker.solve("What is 2 + 3?", strategy="best-of-n", options={"n": 2, "scorer": f"orm:{out}"})
    assert result.details["scorer"] == f"orm:{out.name}"
    assert len(result.details["scores"]) == 2 and all(0.0 <= s <= 1.0 for s in result.details["scores"])
    from thinktime.scorers import release_scorers

    release_scorers()


def test_bad_inputs(files, tmp_path):
    from thinktime.errors import BadInputError

    with pytest.raises(BadInputError, match="unknown training method"):
        train("ppo", "smollm2-135m", [files[0]], tmp_path / "x")
    with pytest.raises(BadInputError, match="needs the columns"):
        train("dpo", "smollm2-135m", [files[0]], tmp_path / "x")  # SFT rows are not pairs
    with pytest.raises(BadInputError, match="not found"):
        train("sft", "smollm2-135m", [tmp_path / "missing.jsonl"], tmp_path / "x")
    # Prompts that fill --max-length leave no answer to train on: named before TRL fails on an empty loader
    with pytest.raises(BadInputError, match="every training row's prompt is at least --max-length"):
        train("sft", "smollm2-135m", [files[0]], tmp_path / "x", TrainSettings(**{**TINY, "max_length": 8}))
    with pytest.raises(BadInputError, match="every training row's prompt is at least --max-length"):
        train("dpo", "smollm2-135m", [files[1]], tmp_path / "x", TrainSettings(**{**TINY, "max_length": 8}))


def test_rows_whose_reply_is_cut_by_max_length_are_reported(engine):
    # TRL keeps a row's start: a reply past --max-length loses its end, where the answer is. Said, not silent.
    from datasets import Dataset

    from thinktime.bootstrap.training import check_lengths

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "What is 2+2?"},
                                            {"role": "assistant", "content": "Let me count. " * 40 + "\\boxed{4}"}]}])
    said: list[str] = []
    check_lengths("sft", rows, engine.tokenizer, 64, said.append)
    assert any("lose the end of their reply" in line for line in said)
    said.clear()
    check_lengths("sft", rows, engine.tokenizer, 4096, said.append)
    assert said == []


def test_preference_pairs_longer_than_max_length_are_reported_or_refused(engine):
    # The reward model's trainer drops pairs past --max-length silently, and fails when none is left.
    from datasets import Dataset

    from thinktime.bootstrap.training import check_lengths
    from thinktime.errors import BadInputError

    prompt = [{"role": "user", "content": "What is 2+2?"}]
    rows = Dataset.from_list([
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Let me count. " * 40 + "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]}])
    said: list[str] = []
    check_lengths("rm", rows, engine.tokenizer, 64, said.append)
    assert any("1 of 2 pairs" in line for line in said)
    with pytest.raises(BadInputError, match="every preference pair"):
        check_lengths("rm", rows, engine.tokenizer, 8, said.append)
