"""`thinktime train grpo` through TRL's real GRPOTrainer on the embedded model (fp32 on the CPU, a few steps of
tiny completions): the reward is the graders' verdict, the weights move, the folder loads in an engine, an
interrupted run resumes from its checkpoint, and bad settings are refused before anything is sampled."""
from __future__ import annotations

import json

import pytest

from thinktime.bootstrap.grpo import GrpoSettings, boxed, correct, length, train_grpo
from thinktime.bootstrap.training import TRAIN_INFO
from thinktime.errors import BadInputError

pytest.importorskip("trl")
pytest.importorskip("peft")

# one-digit sums, a prompt that asks for a short reply: completions of a few tokens that are sometimes right
TINY = {"dataset": "arith:1", "train_problems": 8, "eval_problems": 4, "batch_size": 4, "num_generations": 2,
        "max_completion_length": 12, "system_prompt": "Answer with the number only, as \\boxed{N}.",
        "length_penalty": 0.5, "format_reward": 0.5, "dtype": "fp32", "seed": 0, "learning_rate": 1e-4}


def said(lines: list[str]):
    return lines.append


def test_reward_is_the_graders_verdict():
    chains = [[{"role": "assistant", "content": "47 + 38 = 85. So the answer is \\boxed{85}."}],
              [{"role": "assistant", "content": "47 + 38 = 75. So the answer is \\boxed{75}."}],
              [{"role": "assistant", "content": "47 + 38 = 85, so the answer is 85."}],  # solve's fallback
              [{"role": "assistant", "content": "I am not sure."}]]
    assert correct(chains, gold=["85"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert correct(["\\boxed{\\frac{1}{2}}"], gold=["0.5"]) == [1.0]  # math-verify equivalence, plain text too
    assert boxed(chains) == [1.0, 1.0, 0.0, 0.0]
    assert length(completion_ids=[[1] * 3, [1] * 12], max_tokens=12) == [-0.25, -1.0]


@pytest.mark.parametrize("changes, message", [
    ({"num_generations": 1}, "--num-generations must be at least 2"),
    ({"batch_size": 6, "num_generations": 4}, "must be a multiple of --num-generations"),
    ({"split": "test"}, "train split only"),
    ({"temperature": 0.0}, "--temperature must be above 0"),
    ({"max_completion_length": 0}, "--max-completion-length must be at least 1"),
    ({"length_penalty": -1.0}, "--length-penalty must be 0 or more"),
    ({"generation": "sglang"}, "unknown --generation"),
    ({"generation": "vllm-server"}, "go together"),
    ({"dataset": "nosuchset"}, "unknown dataset"),
    ({"train_problems": 0}, "--train-problems must be at least 1"),
    ({"dataset": "math500", "split": "train"}, "no split 'train'"),
])
def test_bad_settings_are_refused_before_any_sampling(tmp_path, changes, message):
    lines: list[str] = []
    with pytest.raises(BadInputError, match=message):
        train_grpo("smollm2-135m", tmp_path / "out", GrpoSettings(**{**TINY, **changes}), log=said(lines))
    assert not any(line.startswith("grpo: sampling") for line in lines)  # refused before the trainer was built
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_few_steps_change_the_weights_and_write_a_folder_engines_load(tmp_path):
    import torch
    from safetensors.torch import load_file

    from thinktime import models
    from thinktime.engines.hf import TransformersEngine
    from thinktime.types import Prompt, SamplingParams

    out, lines = tmp_path / "grpo-model", []
    info = train_grpo("smollm2-135m", out, GrpoSettings(max_steps=2, **TINY), log=said(lines))
    assert info["steps"] == 2 and info["method"] == "grpo" and len(info["rewards"]) == 2
    assert any("sampling with TRL's own generation" in line for line in lines)  # the path taken is said
    assert all(0.0 <= r["correct"] <= 1.0 for r in info["rewards"])
    assert json.loads((out / TRAIN_INFO).read_text())["generation"] == info["generation"]
    assert not list(tmp_path.glob(".*checkpoints"))  # a finished run leaves no checkpoints behind
    base = load_file(models.resolve("smollm2-135m").path / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    moved = [k for k in base if k in trained and not torch.equal(base[k], trained[k].to(base[k].dtype))]
    assert moved, "two GRPO steps left every weight as it was"
    engine = TransformersEngine(str(out))
    [[completion]] = engine.generate([Prompt.of([{"role": "user", "content": "What is 2 + 3?"}])],
                                     SamplingParams(max_new_tokens=4))
    assert completion.completion_tokens > 0
    engine.close()


class Interrupted(KeyboardInterrupt):
    pass


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "grpo-lora"
    settings = GrpoSettings(max_steps=3, save_steps=1, lora=True, lora_r=4, lora_alpha=8, **TINY)

    def stop_at_step_2(line: str) -> None:  # Ctrl-C while step 2 is logged: step 1 is checkpointed, 2 is not
        if line.startswith("grpo: step 2/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train_grpo("smollm2-135m", out, settings, log=stop_at_step_2)
    scratch = tmp_path / ".grpo-lora.checkpoints"
    assert (scratch / "checkpoint-1").is_dir() and not out.exists()
    with pytest.raises(BadInputError, match="other settings \\(learning_rate\\)"):
        train_grpo("smollm2-135m", out, GrpoSettings(**{**settings.__dict__, "learning_rate": 5e-5}))
    lines: list[str] = []
    info = train_grpo("smollm2-135m", out, settings, log=said(lines))
    assert "grpo: resuming from checkpoint-1" in lines
    assert info["resumed_from"] == 1 and info["steps"] == 3
    assert [r["step"] for r in info["rewards"]] == [1, 2, 3]  # the first run's step kept in the record
    assert not (out / "adapter_config.json").exists()  # LoRA merged: a plain model folder
    assert not scratch.exists()


def test_bootstrap_grpo_rounds_evaluate_held_out_and_plot_against_time(tmp_path):
    from thinktime.bootstrap.loop import BootstrapConfig, run_bootstrap
    from thinktime.bootstrap.plot import plot_against_time
    from thinktime.bootstrap.rounds import RoundSettings

    grpo = GrpoSettings(**{k: v for k, v in TINY.items() if k not in ("dataset", "train_problems", "eval_problems",
                                                                      "max_completion_length")})
    config = BootstrapConfig(model="smollm2-135m", dataset="arith:1", rounds=1, output=str(tmp_path / "run"),
                             train_problems=8, eval_problems=4, dtype="fp32", method="grpo", grpo=grpo, grpo_steps=1,
                             sampling=RoundSettings(max_new_tokens=12))
    summary = run_bootstrap(config, log=lambda m: None)
    first, second = summary["rounds"]
    assert first["training_seconds"] == 0 and second["training_seconds"] > 0
    assert second["train"]["method"] == "grpo" and second["train"]["steps"] == 1
    assert (tmp_path / "run" / "accuracy-time.png").is_file()
    lines: list[str] = []
    again = run_bootstrap(config, log=said(lines))  # a finished run is reused, not trained again
    assert not any(line.startswith("grpo: step") for line in lines)
    assert again["rounds"][1]["eval"] == second["eval"]
    plot_against_time({"GRPO": summary["rounds"], "again": again["rounds"]}, tmp_path / "both.png")
    assert (tmp_path / "both.png").stat().st_size > 0


def test_bootstrap_grpo_rounds_written_as_gguf_evaluate_on_llamacpp(tmp_path):
    """--gguf with --method grpo: each GRPO round's model is written as a GGUF and the next evaluation runs it
    on llama.cpp, as STaR rounds do."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'thinktime[llamacpp]'")
    from thinktime.bootstrap.loop import BootstrapConfig, run_bootstrap
    from thinktime.bootstrap.rounds import RoundSettings

    grpo = GrpoSettings(**{k: v for k, v in TINY.items() if k not in ("dataset", "train_problems", "eval_problems",
                                                                      "max_completion_length")})
    out, lines = tmp_path / "run", []
    config = BootstrapConfig(model="smollm2-135m", dataset="arith:1", rounds=1, output=str(out), train_problems=8,
                             eval_problems=2, engine="auto", gguf="q8_0", method="grpo", grpo=grpo, grpo_steps=1,
                             sampling=RoundSettings(max_new_tokens=12))
    summary = run_bootstrap(config, log=lines.append)
    assert (out / "round-1" / "model" / "model.gguf").is_file()
    assert any("round 1:" in line and "llamacpp engine" in line for line in lines)
    assert summary["rounds"][1]["eval"]["total"] == 2
