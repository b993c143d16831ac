"""`thinktime train prm|ppm` on the embedded model (a few steps on hand-written step data): the folders they
write are found by the `prm:PATH` scorer, score every step, and guide best-of-n; bad data files are named
with their line before any model loads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from thinktime import models
from thinktime.bootstrap.training import TRAIN_INFO, TrainSettings, train
from thinktime.errors import BadInputError
from thinktime.scorers.reward_models import load_reward_model
from thinktime.scorers.step_encoding import REWARD_INFO, encode_steps

pytest.importorskip("trl")
pytest.importorskip("peft")

GOOD = {"What is 2 + 3?": ["2 + 3 = 5.", "The answer is \\boxed{5}."],
        "What is 4 + 4?": ["4 + 4 = 8.", "The answer is \\boxed{8}."]}
BAD = {"What is 2 + 3?": ["2 + 3 = 6.", "The answer is \\boxed{6}."],
       "What is 4 + 4?": ["4 + 4 = 9.", "The answer is \\boxed{9}."]}
QUIET = dict(log=lambda message: None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def step_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("step-data")
    labels = []
    for question in GOOD:
        labels.append({"id": question, "prompt": question, "completions": GOOD[question], "labels": [True, True],
                       "soft_labels": [1.0, 1.0], "gold": "", "rollouts": 4})
        labels.append({"id": question, "prompt": question, "completions": BAD[question], "labels": [False, False],
                       "soft_labels": [0.0, 0.0], "gold": "", "rollouts": 4})
    pairs = [{"id": q, "prompt": q, "prefix": [], "chosen": GOOD[q], "rejected": BAD[q][:1], "chosen_value": 1.0,
              "rejected_value": -1.0} for q in GOOD]
    pairs.append({"id": "p", "prompt": "What is 2 + 3?", "prefix": ["2 + 3 = 5."], "chosen": GOOD["What is 2 + 3?"][1:],
                  "rejected": ["The answer is \\boxed{7}."], "chosen_value": 1.0, "rejected_value": -1.0})
    return write_jsonl(folder / "labels.jsonl", labels), write_jsonl(folder / "pairs.jsonl", pairs)


@pytest.fixture(scope="module")
def prm_folder(step_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("prm") / "model"
    info = train("prm", "smollm2-135m", [step_files[0]], out,
                 TrainSettings(max_steps=8, batch_size=4, max_length=128, learning_rate=1e-4), **QUIET)
    assert info["steps"] == 8
    return out


def test_prm_training_changes_the_weights_and_writes_a_scorer_folder(prm_folder):
    base = load_file(str(models.resolve("smollm2-135m").path / "model.safetensors"))
    trained = load_file(str(prm_folder / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[name], trained[name])
    assert trained["score.weight"].shape[0] == 2  # two labels: bad, good
    assert json.loads((prm_folder / REWARD_INFO).read_text())["kind"] == "prm"
    assert json.loads((prm_folder / TRAIN_INFO).read_text())["method"] == "prm"


def test_prm_scores_steps_labelled_good_above_those_labelled_bad(prm_folder):
    # eight steps over the four labelled chains (about 0.2 apart on them after that; after four, not yet apart)
    scorer = load_reward_model(f"prm:{prm_folder}", device="cpu", dtype="fp32")
    assert scorer.name.startswith("thinktime-prm:")
    for question in GOOD:
        good, bad, empty = scorer.score(question, [GOOD[question], BAD[question], []])
        assert len(good) == len(bad) == 2 and empty == [] and all(0 <= s <= 1 for s in good + bad)
        assert all(g > b for g, b in zip(good, bad))
    scorer.close()


def test_best_of_n_with_the_trained_prm(prm_folder, thinker):
    result = thinker.solve("What is 2 + 3?", strategy="best-of-n", max_new_tokens=16,
                           options={"n": 2, "scorer": f"prm:{prm_folder}"})
    assert result.details["scorer"].startswith("thinktime-prm:") and len(result.candidates) == 2
    assert all(0 <= s <= 1 for s in result.details["scores"])


def test_ppm_lora_scores_every_prefix_as_its_classifier_scores_the_prefix(step_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "ppm"
    info = train("ppm", "smollm2-135m", [step_files[1]], out,
                 TrainSettings(max_steps=1, batch_size=3, max_length=128, lora=True, lora_r=4, lora_alpha=8), **QUIET)
    assert info["steps"] == 1 and not (out / "adapter_config.json").exists()  # merged
    scorer = load_reward_model(f"prm:{out}", device="cpu", dtype="fp32")
    question, steps = "What is 2 + 3?", GOOD["What is 2 + 3?"]
    [scores] = scorer.score(question, [steps])
    classifier = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ids, ends, _ = encode_steps(scorer.tokenizer, question, steps, "\n\n")
    with torch.inference_mode():  # the classifier reads the last token of the prefix that ends with each step
        alone = [float(torch.sigmoid(classifier(input_ids=torch.tensor([ids[:end + 1]])).logits[0, 0]))
                 for end in ends]
    assert scores == pytest.approx(alone, abs=1e-4)
    scorer.close()


@pytest.mark.parametrize("method, row, message", [
    ("prm", {"prompt": "Q", "completions": ["a", "b"]}, "line 2: no 'labels'"),
    ("prm", {"prompt": "Q", "completions": ["a", "b"], "labels": [True]}, "line 2: 1 labels for 2 completions"),
    ("ppm", {"prompt": "Q", "prefix": [], "rejected": ["b"]}, "line 2: no 'chosen'"),
    ("ppm", "not json", "line 2: Expecting value"),
])
def test_bad_step_data_is_named_with_its_line(tmp_path, method, row, message):
    good = {"prompt": "Q", "completions": ["a"], "labels": [True]} if method == "prm" else \
        {"prompt": "Q", "prefix": [], "chosen": ["a"], "rejected": ["b"]}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(BadInputError, match=message):
        train(method, "smollm2-135m", [path], tmp_path / "out", TrainSettings(max_steps=1), **QUIET)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_unlabeled_steps(tmp_path):
    path = write_jsonl(tmp_path / "labels.jsonl", [{"prompt": "Q", "completions": ["a"]}])
    result = subprocess.run([sys.executable, "-m", "thinktime.cli", "train", "prm", "--data", str(path), "-o",
                             str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "line 1: no 'labels'" in result.stderr


def test_compare_verifiers_picks_from_the_same_chains_and_pairs_each_rule_with_majority(prm_folder, engine, tmp_path):
    from typer.testing import CliRunner

    from thinktime import Thinker
    from thinktime.cli import app
    from thinktime.evaluation.datasets import load_dataset
    from thinktime.evaluation.runner import Settings, build_config, run_eval
    from thinktime.evaluation.store import RunStore
    from thinktime.scorers import aggregate
    from thinktime.strategies.steps import DEFAULT_DELIMITER, split_steps

    data, thinker = load_dataset("arith:1", limit=3), Thinker(engine=engine, max_new_tokens=32, temperature=0.7)
    runs = {"sc": Settings("self-consistency", [1, 4], seed=1),
            "beam": Settings("beam", [2], seed=1, options={"scorer": f"prm:{prm_folder}", "depth": 2, "step_tokens": 24})}
    for name, settings in runs.items():
        with RunStore(tmp_path / name, build_config(thinker, data, settings)) as store:
            run_eval(thinker, data, store, settings)
    result = CliRunner().invoke(app, ["compare-verifiers", str(tmp_path / "sc"), "--scorer", f"prm:{prm_folder}",
                                      "-n", "1,4", "--aggregate", "min", "--search", str(tmp_path / "beam"),
                                      "--dtype", "fp32", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rules = {r["rule"]: r for r in json.loads((tmp_path / "out" / "verifiers.json").read_text())["rules"]}
    spec = f"prm:{prm_folder}"
    assert [name.split(" ")[0] for name in rules] == ["maj@1", "pass@1", "maj@4", "best-of-4", "weighted@4", "pass@4",
                                                      "beam"]
    records = [json.loads(line) for line in (tmp_path / "sc" / "records.jsonl").read_text().splitlines()]
    assert rules["maj@4"]["correct"] == sum(bool(r["by_k"]["4"]["correct"]) for r in records)
    # best-of-4 is the chain the PRM rates highest by its weakest step, among the same four chains
    scorer = load_reward_model(spec, device="cpu", dtype="fp32")
    expected, right, wrong = 0, [], []
    for r in records:
        chains = [split_steps(c["text"], DEFAULT_DELIMITER) or [c["text"]] for c in r["candidates"]]
        scores = [aggregate(s, "min") for s in scorer.score(r["question"], chains)]
        expected += bool(r["candidates"][max(range(4), key=lambda i: (scores[i], -i))]["correct"])
        for c, score in zip(r["candidates"], scores):
            (right if c["correct"] else wrong).append(score)
    scorer.close()
    # AUROC: the share of (right, wrong) chain pairs in which the right one scores higher, ties half
    separation = json.loads((tmp_path / "out" / "verifiers.json").read_text())["separation"][spec]
    assert (separation["right"], separation["wrong"]) == (len(right), len(wrong))
    if right and wrong:
        pairs = [(a > b) + 0.5 * (a == b) for a in right for b in wrong]
        assert separation["auroc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-4)
    assert rules[f"best-of-4 ({spec})"]["correct"] == expected
    assert all(rules["pass@4"]["correct"] >= r["correct"] for n, r in rules.items() if r["n"] == 4)
    versus = rules[f"best-of-4 ({spec})"]["vs_majority"]
    assert versus["wins"] - versus["losses"] == expected - rules["maj@4"]["correct"]
    assert 0 < versus["sign_test_p"] <= 1 and rules["beam (beam)"]["problems"] == 3
    assert (tmp_path / "out" / "verifiers.png").stat().st_size > 0 and "sign test p" in (
        tmp_path / "out" / "verifiers.md").read_text()
    # asking for an N the run did not vote at is refused with the ones it did
    result = CliRunner().invoke(app, ["compare-verifiers", str(tmp_path / "sc"), "--scorer", spec, "-n", "8"])
    assert result.exit_code == 2 and "the run voted at 1, 4" in result.output
    result = CliRunner().invoke(app, ["compare-verifiers", str(tmp_path / "nowhere"), "--scorer", spec])
    assert result.exit_code == 2 and "not an eval run folder" in result.output
