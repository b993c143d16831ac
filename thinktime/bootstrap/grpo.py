"""`thinktime train grpo`: TRL's GRPOTrainer with thinktime's graders as the reward.

Each step samples `num_generations` completions per training problem (a group) and rewards each:

    correct  1 when the answer extracted as `solve` extracts it (the last \\boxed{}, else "the answer is X",
             else the last number) is math-verify equivalent to the gold answer, else 0
    boxed    (optional, weight --format-reward) 1 when the chain ends its answer in a \\boxed{}
    length   (optional, weight --length-penalty) minus the completion's length over --max-completion-length

The prompts are the chat messages `solve` sends (the deep-thinking system prompt, or --system-prompt)
for the training problems of the set: its train split where it has one, else its first
--train-problems, the last --eval-problems held out as `thinktime bootstrap` holds them out.
Checkpoints go to OUT/../.OUT.checkpoints every --save-steps; rerunning the same command resumes from
the latest one. The output folder is like the other methods': save_pretrained weights (LoRA merged),
the tokenizer and thinktime-train.json.
"""
from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from thinktime.bootstrap.training import (
    TRAIN_INFO,
    TrainSettings,
    _check_output,
    _dtype_name,
    cpu_autocast,
    load_tokenizer,
    lora_config,
    save_model,
)
from thinktime.errors import BadInputError
from thinktime.evaluation.splits import split_problems, training_split

GENERATIONS = ("auto", "transformers", "vllm", "vllm-server")
RUN_INFO = "thinktime-grpo.json"  # the settings of the run that wrote a checkpoint folder


@dataclass
class GrpoSettings(TrainSettings):
    beta: float = 0.0  # KL to the starting model: 0 loads no reference model
    batch_size: int = 16  # completions per step: batch_size / num_generations problems
    dataset: str = "arith:2"
    split: str | None = None  # None or "train": the train split where the set has one
    train_problems: int = 120
    eval_problems: int = 100  # held out (the last of the set), never trained on
    data_seed: int = 0
    num_generations: int = 8  # completions per problem (the group the advantages are relative to)
    max_completion_length: int = 256
    temperature: float = 1.0
    format_reward: float = 0.0  # weight of the \boxed{} reward
    length_penalty: float = 0.0  # weight of minus the completion's relative length
    system_prompt: str | None = None  # None: solve's deep-thinking prompt
    lang: str = "auto"
    save_steps: int = 25
    generation: str = "auto"
    vllm_server: str | None = None  # http://HOST:PORT of `trl vllm-serve`

    def check(self) -> None:
        """Refuse what TRL would refuse after loading the model, or later, before any sampling."""
        super().check()
        if self.num_generations < 2:
            raise BadInputError(f"--num-generations must be at least 2, got {self.num_generations}",
                                hint="GRPO compares each completion with the others of its group")
        completions, group = self.batch_size * self.grad_accum, self.num_generations
        if completions % group:
            raise BadInputError(f"--batch-size x --grad-accum ({completions} completions a step) must be a multiple "
                                f"of --num-generations ({self.num_generations}): each step holds whole groups",
                                hint=f"e.g. --batch-size {group * max(1, completions // group)}")
        self._check_numbers()
        if self.split not in (None, "train"):
            raise BadInputError(f"GRPO trains on a train split only, not {self.split!r}",
                                hint="leave --split out: the set's train split, or its first problems with the "
                                     "last --eval-problems held out")
        if self.generation not in GENERATIONS:
            raise BadInputError(f"unknown --generation {self.generation!r}",
                                hint=f"use one of {', '.join(GENERATIONS)}")
        if (self.generation == "vllm-server") != bool(self.vllm_server):
            raise BadInputError("--generation vllm-server and --vllm-server URL go together",
                                hint="start one with `trl vllm-serve --model MODEL`")
        if self.lang not in ("auto", "en", "zh"):
            raise BadInputError(f"unknown language {self.lang!r}", hint="use auto, en or zh")

    def _check_numbers(self) -> None:
        for name, value in (("--max-completion-length", self.max_completion_length),
                            ("--train-problems", self.train_problems), ("--eval-problems", self.eval_problems),
                            ("--save-steps", self.save_steps)):
            if value < 1:
                raise BadInputError(f"{name} must be at least 1, got {value}")
        if not self.temperature > 0:
            raise BadInputError(f"--temperature must be above 0, got {self.temperature:g}",
                                hint="greedy completions of a group are all the same: no advantage to learn from")
        for name, value in (("--format-reward", self.format_reward), ("--length-penalty", self.length_penalty),
                            ("--beta", self.beta)):
            if value < 0:
                raise BadInputError(f"{name} must be 0 or more, got {value:g}")


# --- rewards: thinktime's graders ---------------------------------------------------------------

def _text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct(completions, gold, **_) -> list[float]:
    """1 when the extracted answer grades correct against the gold answer (as `solve` and `eval` grade)."""
    from thinktime.bootstrap.filter import grade_texts

    return [float(grade_texts([_text(c)], g)[0].correct) for c, g in zip(completions, gold, strict=True)]


def boxed(completions, **_) -> list[float]:
    """1 when the chain's answer is a \\boxed{} (the format solve's prompt asks for)."""
    from thinktime.strategies.base import to_candidate
    from thinktime.types import Completion

    return [float(to_candidate(Completion(_text(c), "stop", 0, 0)).answer_method == "boxed") for c in completions]


def length(completion_ids, max_tokens: int, **_) -> list[float]:
    """Minus the completion's length as a fraction of the most it may have."""
    return [-len(ids) / max_tokens for ids in completion_ids]


def reward_functions(settings: GrpoSettings) -> tuple[list, list[float]]:
    """The reward functions and their weights (a weight of 0 leaves its function out)."""
    funcs, weights = [correct], [1.0]
    if settings.format_reward:
        funcs.append(boxed)
        weights.append(settings.format_reward)
    if settings.length_penalty:
        funcs.append(functools.partial(length, max_tokens=settings.max_completion_length))
        weights.append(settings.length_penalty)
    return funcs, weights


# --- prompts ------------------------------------------------------------------------------------

def prompt_messages(question: str, spec, settings: GrpoSettings) -> list[dict]:
    """The messages `solve` sends for `question`: Thinker.messages itself, on a stand-in without an engine
    (building one would load the model a second time)."""
    from thinktime.api import Thinker

    asker = SimpleNamespace(engine=SimpleNamespace(spec=spec), system_prompt=settings.system_prompt, think=True,
                            lang=settings.lang, max_new_tokens=settings.max_completion_length)
    return Thinker.messages(asker, question)


def training_rows(settings: GrpoSettings, spec):
    """The training problems as TRL's conversational prompt rows, with the gold answer for the reward."""
    from datasets import Dataset

    if settings.split == "train" and training_split(settings.dataset) is None:
        raise BadInputError(f"{settings.dataset} has no split 'train'",
                            hint="leave --split out: its first problems train, the last --eval-problems are held out")
    problems, _ = split_problems(settings)
    return Dataset.from_list([{"prompt": prompt_messages(p.question, spec, settings), "gold": p.gold, "id": p.id}
                              for p in problems])


# --- generation path ----------------------------------------------------------------------------

def generation_path(settings: GrpoSettings, device: str) -> tuple[dict, str]:
    """GRPOConfig fields for the fastest sampling that works here, and a line saying which."""
    if settings.generation == "vllm-server":
        return ({"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": settings.vllm_server},
                f"vLLM server at {settings.vllm_server}")
    has_vllm = _vllm_installed()
    if settings.generation == "vllm" or (settings.generation == "auto" and has_vllm and device.startswith("cuda")):
        if not has_vllm or not device.startswith("cuda"):
            raise BadInputError("--generation vllm needs vLLM and a GPU",
                                hint="pip install vllm on a GPU machine, or --generation transformers")
        return {"use_vllm": True, "vllm_mode": "colocate"}, "vLLM in this process (colocate)"
    why = "" if settings.generation == "transformers" else (
        "; vLLM is not installed" if not has_vllm else "; no GPU for vLLM")
    return {}, f"TRL's own generation (transformers generate{why})"


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# --- checkpoints and resuming -------------------------------------------------------------------

def run_record(model: str, settings: GrpoSettings) -> dict:
    return {"method": "grpo", "base": model, "settings": asdict(settings)}


def resume_point(scratch: Path, record: dict) -> str | None:
    """The latest checkpoint of an interrupted run of the same settings; refuses one of other settings."""
    info = scratch / RUN_INFO
    if not info.is_file():
        return None
    old = json.loads(info.read_text())
    if old != record:
        diff = sorted(k for k in set(old["settings"]) | set(record["settings"])
                      if old["settings"].get(k) != record["settings"].get(k))
        diff += ["model"] if old.get("base") != record["base"] else []
        raise BadInputError(f"{scratch} holds the checkpoints of a GRPO run with other settings ({', '.join(diff)})",
                            hint="rerun with the same settings to resume it, pass another --output, or delete "
                                 "that folder to start afresh")
    steps = [int(p.name.split("-")[-1]) for p in scratch.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return str(scratch / f"checkpoint-{max(steps)}") if steps else None


LOGGED = {"reward": "reward", "rewards/correct/mean": "correct", "rewards/boxed/mean": "boxed",
          "rewards/length/mean": "length_reward", "completions/mean_length": "length"}


def _report_through(trainer, log) -> list[dict]:
    """One line per step (reward, the graders' accuracy, length, time) instead of printed dicts; returns the
    list the steps are recorded in."""
    from transformers import PrinterCallback, TrainerCallback

    steps: list[dict] = []

    class Report(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:
                return
            row = {"step": state.global_step, **{name: round(float(logs[key]), 4) for key, name in LOGGED.items()
                                                 if logs.get(key) is not None},
                   "seconds": round(time.perf_counter() - self.began, 2)}
            steps.append(row)
            log(f"grpo: step {row['step']}/{state.max_steps} reward {row['reward']:.3f} correct "
                f"{row.get('correct', 0.0):.3f} length {row.get('length', 0.0):.0f} tokens, {row['seconds']:.1f} s")

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Report())
    return steps


# --- the run ------------------------------------------------------------------------------------

def grpo_config(settings: GrpoSettings, scratch: Path, device: str, dtype: str, autocast: bool, generation: dict):
    from dataclasses import fields

    from trl import GRPOConfig

    _, weights = reward_functions(settings)
    checkpointing = settings.gradient_checkpointing if settings.gradient_checkpointing is not None \
        else device.startswith("cuda")
    values = dict(
        output_dir=str(scratch), num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr("grpo"), lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="steps", save_steps=settings.save_steps, save_total_limit=1, report_to="none",
        seed=settings.seed, use_cpu=device == "cpu", disable_tqdm=True, dataloader_num_workers=0,
        bf16=(dtype == "bfloat16" and device.startswith("cuda")) or autocast, fp16=dtype == "float16",
        model_init_kwargs={"dtype": dtype}, gradient_checkpointing=checkpointing,
        num_generations=settings.num_generations, max_completion_length=settings.max_completion_length,
        temperature=settings.temperature, beta=settings.beta, reward_weights=weights, **generation,
    )
    if "activation_checkpointing" in {f.name for f in fields(GRPOConfig)}:  # the newer name (transformers 5.2x)
        values["activation_checkpointing"] = values.pop("gradient_checkpointing")
    return GRPOConfig(**values)


def train_grpo(model: str, output: str | Path, settings: GrpoSettings | None = None, log=print) -> dict:
    """GRPO on the dataset's training problems with the graders' reward; writes a loadable model folder."""
    settings = settings or GrpoSettings()
    settings.check()
    output = Path(output)
    _check_output(output)
    from thinktime import models
    from thinktime.engines.device import pick_device

    started = time.perf_counter()
    resolved = models.resolve(model)
    source, device = str(resolved.path), pick_device(settings.device)
    rows = training_rows(settings, resolved.spec)
    scratch = output.parent / f".{output.name}.checkpoints"
    record = run_record(source, settings)
    checkpoint = resume_point(scratch, record)
    dtype = _dtype_name(settings.dtype, device)
    autocast = cpu_autocast(settings, device, dtype)
    generation, path_line = generation_path(settings, device)
    tokenizer = load_tokenizer(source)
    log(f"grpo: {len(rows)} problems of {settings.dataset}, groups of {settings.num_generations}, "
        f"{settings.batch_size * settings.grad_accum // settings.num_generations} problems a step, "
        f"{'LoRA r=' + str(settings.lora_r) if settings.lora else 'full'} on {device} in {dtype}"
        f"{' (bf16 autocast)' if autocast else ''}, lr {settings.lr('grpo'):g}, beta {settings.beta:g}")
    log(f"grpo: sampling with {path_line}")
    trainer = _trainer(source, settings, rows, tokenizer, grpo_config(settings, scratch, device, dtype, autocast,
                                                                      generation))
    steps = _report_through(trainer, log)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / RUN_INFO).write_text(json.dumps(record, indent=2) + "\n")
    if checkpoint:
        log(f"grpo: resuming from {Path(checkpoint).name}")
    result = _train_keeping_checkpoints(trainer, checkpoint, scratch, log)
    info = _save(trainer, tokenizer, output, settings, source, device, dtype, autocast, path_line)
    info.update(rows=len(rows), rewards=_rewards(trainer, steps),
                resumed_from=int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None,
                train_loss=round(float(result.training_loss), 5), seconds=round(time.perf_counter() - started, 1))
    (output / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)  # finished: nothing left to resume
    last = info["rewards"][-1] if info["rewards"] else {}
    log(f"grpo: {info['steps']} steps, last reward {last.get('reward', 0):.3f}, {info['seconds']} s -> {output}")
    return info


def _trainer(source: str, settings: GrpoSettings, rows, tokenizer, config):
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    peft_config = lora_config(settings, "CAUSAL_LM")
    funcs, _ = reward_functions(settings)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generation-config notes on loading say nothing useful here
    try:
        return GRPOTrainer(model=source, reward_funcs=funcs, args=config, train_dataset=rows,
                           processing_class=tokenizer, peft_config=peft_config)
    finally:
        hf_logging.set_verbosity(level)


def _train_keeping_checkpoints(trainer, checkpoint: str | None, scratch: Path, log):
    """Train; an interrupted run keeps its checkpoints (the same command resumes), one that saved none leaves
    nothing behind."""
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException:
        if any(scratch.glob("checkpoint-*")):
            log(f"grpo: stopped; rerun the same command to resume from the checkpoints in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
        raise


def _save(trainer, tokenizer, output: Path, settings: GrpoSettings, source: str, device: str, dtype: str,
          autocast: bool, path_line: str) -> dict:
    save_model(trainer, tokenizer, output, settings.lora)
    return {"method": "grpo", "base": source, "dataset": settings.dataset, "settings": asdict(settings),
            "learning_rate": settings.lr("grpo"), "device": device, "dtype": dtype, "cpu_autocast_bf16": autocast,
            "generation": path_line, "steps": trainer.state.global_step}


def _rewards(trainer, steps: list[dict]) -> list[dict]:
    """Reward per step: the trainer's log history (a resumed run's earlier steps included), with the step times
    this process measured."""
    timed = {row["step"]: row["seconds"] for row in steps}
    return [{"step": e["step"], **{name: round(float(e[key]), 4) for key, name in LOGGED.items()
                                   if e.get(key) is not None}, "seconds": timed.get(e["step"])}
            for e in trainer.state.log_history if "reward" in e]
