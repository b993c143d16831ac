"""`thinktime train sft|dpo|rm`: TRL trainers with full fine-tuning or LoRA; writes a model folder.

    sft  SFTTrainer on chat rows {"messages": [...]}; by default the loss covers the assistant reply
         only (each row is given to TRL as conversational prompt-completion)
    dpo  DPOTrainer on {"prompt", "chosen", "rejected"} (conversational); the reference model is the
         starting model (with LoRA: the base with the adapter switched off)
    rm   RewardTrainer: AutoModelForSequenceClassification with num_labels=1 on the same pairs, their
         system message dropped, as thinktime's `orm:PATH` scorer reads [user, assistant]
    prm  a token-classification process reward model on step labels, ppm a step-pair preference model
         (thinktime.bootstrap.reward_training); the folder also holds thinktime-reward.json for `prm:PATH`

The output folder holds save_pretrained weights (safetensors) and the tokenizer, merged when LoRA
was used, so `--model FOLDER` works with every engine (and `--scorer orm:FOLDER` for `rm`), plus
thinktime-train.json (settings, loss per logging step, time). On a CPU the weights stay fp32 and
the matrix products run in bf16 under autocast where the CPU has bf16 instructions (AVX512-BF16 or
AMX: 1.8x faster per step for the embedded model on an AMD EPYC, the same losses to three digits);
on a GPU the model trains in bf16 (an 8B model: pass --lora; gradient checkpointing is on there).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from thinktime.errors import BadInputError

METHODS = ("sft", "dpo", "rm", "grpo", "prm", "ppm")  # grpo: thinktime.bootstrap.grpo (it samples; no --data)
STEP_METHODS = ("prm", "ppm")  # step-level reward models: thinktime.bootstrap.reward_training
# Learning rates that worked for each method (full fine-tuning, LoRA).
DEFAULT_LR = {"sft": (3e-5, 2e-4), "dpo": (1e-6, 5e-6), "rm": (1e-5, 1e-4), "grpo": (1e-5, 1e-4),
              "prm": (2e-5, 1e-4), "ppm": (1e-5, 1e-4)}
TRAIN_INFO = "thinktime-train.json"
LORA_TASKS = {"rm": "SEQ_CLS", "ppm": "SEQ_CLS", "prm": "TOKEN_CLS"}  # peft's task type (else CAUSAL_LM)


@dataclass
class TrainSettings:
    epochs: float = 3.0
    learning_rate: float | None = None  # None: DEFAULT_LR by method and full/LoRA
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 2048  # the Chinese thinking prompt alone is ~1,300 SmolLM2 tokens
    max_steps: int = -1  # > 0 overrides epochs
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    beta: float = 0.1  # dpo
    completion_only: bool = True  # sft: loss on the reply only
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # fp32 on CPU, bf16 on GPU by default
    gradient_checkpointing: bool | None = None  # default: on for GPU
    # fp32 weights with bf16 matrix products (torch.autocast) on a CPU that has bf16 instructions;
    # None: on where it has them, False: plain fp32
    cpu_autocast_bf16: bool | None = None

    def lr(self, method: str) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[method][int(self.lora)]

    def check(self) -> None:
        """Refuse settings that would fail deep inside TRL, or train nothing and call it done."""
        if self.max_steps <= 0 and not self.epochs > 0:
            raise BadInputError(f"--epochs must be above 0, got {self.epochs:g}", hint="or set --max-steps")
        for name, value in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                            ("--max-length", self.max_length)):
            if value < 1:
                raise BadInputError(f"{name} must be at least 1, got {value}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise BadInputError(f"--lr must be above 0, got {self.learning_rate:g}")
        if self.lora and self.lora_r < 1:
            raise BadInputError(f"--lora-r must be at least 1, got {self.lora_r}")


def _dtype_name(dtype: str | None, device: str) -> str:
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16",
             "float16": "float16", "float32": "float32"}
    if dtype in (None, "", "auto"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in names:
        raise BadInputError(f"unknown dtype {dtype!r}", hint="use bf16, fp16 or fp32")
    return names[dtype]


def cpu_has_bf16() -> bool:
    from thinktime.engines.onednn import cpu_has_bf16 as native_bf16  # torch, imported only when needed

    return native_bf16()


def load_rows(method: str, files: Sequence[str | Path], completion_only: bool = True):
    """The training files as a `datasets.Dataset` in the columns the method's trainer reads."""
    from datasets import load_dataset

    from thinktime.bootstrap.data import to_prompt_completion, without_system

    paths = [str(Path(f)) for f in files]
    for path in paths:
        if not Path(path).is_file():
            raise BadInputError(f"training data not found: {path}", hint="pass the sft.jsonl / pairs.jsonl files "
                                "that `thinktime bootstrap` wrote")
    if not any(Path(path).read_text(encoding="utf-8").strip() for path in paths):  # datasets fails on empty files
        raise BadInputError(f"no rows to train on in {', '.join(paths)}",
                            hint="a bootstrap round that made no pairs writes an empty pairs.jsonl")
    if method in STEP_METHODS:  # checked line by line: a bad row is named with its line
        from thinktime.bootstrap.reward_training import load_step_rows

        return load_step_rows(method, paths)
    rows = load_dataset("json", data_files=paths, split="train")
    need = ["messages"] if method == "sft" else ["prompt", "chosen", "rejected"]
    missing = [c for c in need if c not in rows.column_names]
    if missing:
        raise BadInputError(f"{method} data needs the columns {need}; missing {missing} in {', '.join(paths)}",
                            hint="sft reads sft.jsonl ({\"messages\"}); dpo and rm read pairs.jsonl")
    if len(rows) == 0:
        raise BadInputError(f"no rows to train on in {', '.join(paths)}")
    if method == "sft":
        if completion_only:
            return rows.map(to_prompt_completion, remove_columns=rows.column_names)
        return rows.select_columns(["messages"])
    if method == "rm":
        return rows.map(without_system, remove_columns=rows.column_names)
    return rows.select_columns(need)


def _report_through(trainer, log, method: str) -> None:
    """Training progress through `log` (stderr in the CLI) instead of transformers' printed dicts."""
    from transformers import PrinterCallback, TrainerCallback

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log(f"{method}: step {state.global_step}/{state.max_steps} loss {float(logs['loss']):.4f}")

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Report())


def _check_output(output: Path) -> None:
    """The output folder is replaced by the trained model: only an empty folder or an earlier training output
    (it holds TRAIN_INFO) may be, never a folder of other files (`-o .` would have emptied the working folder)."""
    if output.is_file():
        raise BadInputError(f"the output {output} is a file", hint="pass a folder for the trained model")
    if output.is_dir() and any(output.iterdir()) and not (output / TRAIN_INFO).is_file():
        raise BadInputError(f"{output} holds other files, and training would replace the folder",
                            hint="pass a new (or empty) folder, or one that an earlier `thinktime train` wrote")


def check_lengths(method: str, rows, tokenizer, max_length: int, log=print) -> None:
    """Rows whose prompt alone fills `max_length` keep no answer tokens after truncation: TRL drops them, and
    with none left it fails deep inside the data loader. Say so first, with the length that would fit."""
    if method in STEP_METHODS:  # their trainers tokenize in the scorer's layout and check lengths there
        return
    column = "prompt" if "prompt" in rows.column_names else "messages"
    if method == "rm":
        _check_pair_lengths(rows, tokenizer, max_length, log)
        return
    if column not in rows.column_names:
        return

    def prompt_length(row) -> int:
        messages = row[column] if column == "prompt" else row[column][:-1]
        if isinstance(messages, str):
            return len(tokenizer(messages, add_special_tokens=False).input_ids)
        return len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])

    lengths = [prompt_length(row) for row in rows]
    too_long = sum(length >= max_length for length in lengths)
    if too_long == len(lengths):
        raise BadInputError(f"every training row's prompt is at least --max-length ({max_length}) tokens long "
                            f"(the longest {max(lengths)}), so no answer token would be trained on",
                            hint=f"raise --max-length above {max(lengths)} plus room for the answers, "
                                 f"e.g. --max-length {max(lengths) + 512}")
    if too_long:
        log(f"{method}: {too_long} of {len(lengths)} rows have prompts of --max-length ({max_length}) tokens or "
            f"more and are left out; --max-length {max(lengths) + 512} would keep them")

    def whole_length(row) -> int:  # the prompt and its (chosen) reply: what TRL cuts at max_length
        messages = row[column] if column == "messages" else list(row[column]) + list(row.get("chosen") or [])
        if isinstance(messages, str) or not messages:
            return 0
        return len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])

    wholes = [whole_length(row) for row in rows]
    cut = sum(length > max_length for length in wholes)
    if cut:  # TRL keeps the start: the end of the reply, where the answer is, would not be trained on
        log(f"{method}: warning: {cut} of {len(wholes)} rows are longer than --max-length ({max_length}) tokens and "
            f"lose the end of their reply (the answer); --max-length {max(wholes)} keeps them whole")


def _check_pair_lengths(rows, tokenizer, max_length: int, log=print) -> None:
    """TRL's RewardTrainer drops a pair whose chosen or rejected conversation is longer than max_length, and
    fails when none is left: say how many go, and refuse when all would."""
    if not {"prompt", "chosen", "rejected"} <= set(rows.column_names):
        return

    def longest(row) -> int:
        prompt = list(row["prompt"]) if not isinstance(row["prompt"], str) else []
        return max(len(tokenizer.apply_chat_template(prompt + list(row[side]), tokenize=True)["input_ids"])
                   for side in ("chosen", "rejected") if not isinstance(row[side], str))

    lengths = [longest(row) for row in rows]
    dropped = sum(length > max_length for length in lengths)
    if dropped == len(lengths):
        raise BadInputError(f"every preference pair is longer than --max-length ({max_length}) tokens (the shortest "
                            f"{min(lengths)}), and the reward model's trainer drops such pairs",
                            hint=f"raise --max-length, e.g. --max-length {max(lengths)}")
    if dropped:
        log(f"rm: warning: {dropped} of {len(lengths)} pairs are longer than --max-length ({max_length}) tokens "
            f"and are left out; --max-length {max(lengths)} keeps them")


def train(method: str, model: str, data: Sequence[str | Path], output: str | Path,
          settings: TrainSettings | None = None, log=print) -> dict:
    """Train `model` on `data` with TRL and write a loadable model folder to `output`."""
    if method not in METHODS:
        raise BadInputError(f"unknown training method {method!r}", hint=f"use one of {', '.join(METHODS)}")
    if method == "grpo":
        raise BadInputError("grpo samples its own completions from a dataset's problems, not from --data files",
                            hint="thinktime train grpo --dataset NAME (thinktime.bootstrap.grpo.train_grpo)")
    settings = settings or TrainSettings()
    settings.check()
    output = Path(output)
    _check_output(output)
    import torch
    import transformers

    from thinktime import models
    from thinktime.engines.device import pick_device

    started = time.perf_counter()
    source = models.resolve(model).path
    device = pick_device(settings.device)
    dtype = _dtype_name(settings.dtype, device)
    rows = load_rows(method, data, settings.completion_only)
    tokenizer = load_tokenizer(source)
    check_lengths(method, rows, tokenizer, settings.max_length, log)
    scratch = output.parent / f".{output.name}.checkpoints"
    autocast = cpu_autocast(settings, device, dtype)
    Config, Trainer, args = _trainer_setup(method, settings, len(rows), scratch, device, dtype, autocast, log)
    transformers.set_seed(settings.seed)  # a new score head is drawn at load: the same seed, the same head
    trainer, result = _fit(Trainer, Config, args, source, rows, tokenizer,
                           lora_config(settings, LORA_TASKS.get(method, "CAUSAL_LM")), log, method)
    trained = save_model(trainer, tokenizer, output, settings.lora)
    losses = [{"step": e["step"], "loss": round(e["loss"], 5)} for e in trainer.state.log_history if "loss" in e]
    info = {"method": method, "base": str(source), "data": [str(d) for d in data], "rows": len(rows),
            "settings": asdict(settings), "learning_rate": settings.lr(method), "device": device, "dtype": dtype,
            "cpu_autocast_bf16": autocast,
            "steps": trainer.state.global_step, "train_loss": round(float(result.training_loss), 5),
            "losses": losses, "seconds": round(time.perf_counter() - started, 1)}
    (output / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if method in STEP_METHODS:  # what the prm:PATH scorer recognises the folder by
        from thinktime.scorers.step_encoding import write_reward_info
        from thinktime.strategies.steps import DEFAULT_DELIMITER

        write_reward_info(output, method, DEFAULT_DELIMITER, str(source))
    shutil.rmtree(scratch, ignore_errors=True)
    del trainer, trained
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"{method}: {info['steps']} steps, loss {info['train_loss']}, {info['seconds']} s -> {output}")
    return info


def _trainer_setup(method: str, settings: TrainSettings, rows: int, scratch: Path, device: str, dtype: str,
                   autocast: bool, log) -> tuple[type, type, dict]:
    """The method's TRL (or transformers) config and trainer classes, and the config's arguments."""
    checkpointing = settings.gradient_checkpointing if settings.gradient_checkpointing is not None \
        else device.startswith("cuda")
    steps_per_epoch = math.ceil(rows / (settings.batch_size * settings.grad_accum))
    args = dict(
        output_dir=str(scratch), num_train_epochs=settings.epochs, max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr(method), lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=max(1, steps_per_epoch // 4), save_strategy="no", report_to="none", seed=settings.seed,
        use_cpu=device == "cpu", bf16=(dtype == "bfloat16" and device.startswith("cuda")) or autocast,
        fp16=dtype == "float16", model_init_kwargs={"dtype": dtype}, gradient_checkpointing=checkpointing,
        max_length=settings.max_length, disable_tqdm=True, dataloader_num_workers=0,
    )
    if method == "sft":
        from trl import SFTConfig as Config, SFTTrainer as Trainer
    elif method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer

        args["beta"] = settings.beta
    elif method in STEP_METHODS:
        from thinktime.bootstrap.reward_training import trainer_for

        Config, Trainer = trainer_for(method)
    else:
        from trl import RewardConfig as Config, RewardTrainer as Trainer
    if "activation_checkpointing" in {f.name for f in fields(Config)}:  # the newer name (transformers 5.2x)
        args["activation_checkpointing"] = args.pop("gradient_checkpointing")
    log(f"{method}: {rows} rows, {steps_per_epoch} steps/epoch x {settings.epochs} epochs, "
        f"{'LoRA r=' + str(settings.lora_r) if settings.lora else 'full'} on {device} in {dtype}"
        f"{' (bf16 autocast)' if autocast else ''}, "
        f"lr {settings.lr(method):g}")
    return Config, Trainer, args


def _fit(Trainer, Config, args: dict, source, rows, tokenizer, peft_config, log, method: str):
    """The trainer made and trained; a failed run leaves no scratch folder (args' output_dir) behind."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new score head and the like show up as loading warnings
    try:
        trainer = Trainer(model=str(source), args=Config(**args), train_dataset=rows, processing_class=tokenizer,
                          peft_config=peft_config)
        _report_through(trainer, log, method)
        return trainer, trainer.train()
    except BaseException:
        shutil.rmtree(args["output_dir"], ignore_errors=True)
        raise
    finally:
        hf_logging.set_verbosity(level)


def load_tokenizer(source):
    """The model's tokenizer, padding with its end-of-sequence token where it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cpu_autocast(settings, device: str, dtype: str) -> bool:
    """bf16 autocast over fp32 weights on a CPU: the setting, else where the CPU has bf16 instructions."""
    return device == "cpu" and dtype == "float32" and (
        settings.cpu_autocast_bf16 if settings.cpu_autocast_bf16 is not None else cpu_has_bf16())


def lora_config(settings, task_type: str):
    """peft's LoRA config over every linear layer, or None for full fine-tuning."""
    if not settings.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules="all-linear", task_type=task_type)


def save_model(trainer, tokenizer, output: Path, lora: bool):
    """The trained model (LoRA adapters merged in) and its tokenizer written to `output`, replacing it."""
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        trained = trained.merge_and_unload()
    if output.exists():
        shutil.rmtree(output)
    trained.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return trained
