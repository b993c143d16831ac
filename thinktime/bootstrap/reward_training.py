"""`thinktime train prm|ppm`: reward models that judge steps, trained by `training.train` like the others.

    prm  transformers' Trainer on AutoModelForTokenClassification (2 labels; TRL 1.x has no PRM trainer):
         step labels {"prompt", "completions", "labels"}, a hard label on the delimiter token after each step
    ppm  TRL's RewardTrainer (scalar head, -log sigmoid(r+ - r-)) on step pairs {"prompt", "prefix", "chosen",
         "rejected"}: each side is the prefix and its steps, the reward read at the last step's last token

Both trainers take TRL's constructor arguments, so `training.train` drives them with its settings, LoRA,
merge and folder writing; the token layout is thinktime.scorers.step_encoding's, which the `prm:PATH`
scorer reads back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer, TrainingArguments
from trl import RewardTrainer

from thinktime.errors import BadInputError
from thinktime.scorers.step_encoding import encode_steps
from thinktime.strategies.steps import DEFAULT_DELIMITER

HINTS = {"prm": "prm trains on step labels from `thinktime label`: {\"prompt\", \"completions\": [steps], "
                "\"labels\": [true/false per step]} per line",
         "ppm": "ppm trains on step pairs from tree search: {\"prompt\", \"prefix\": [steps], \"chosen\": [steps], "
                "\"rejected\": [steps]} per line"}


def load_step_rows(method: str, paths: list[str]):
    """The rows of step-label (prm) or step-pair (ppm) files, checked line by line, as a `datasets.Dataset`."""
    from datasets import Dataset

    check = _label_row if method == "prm" else _pair_row
    rows = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                checked = check(row)
            except ValueError as e:  # json's errors are ValueErrors too
                raise BadInputError(f"{path} line {number}: {e}", hint=HINTS[method]) from None
            if checked is not None:
                rows.append(checked)
    if not rows:
        raise BadInputError(f"no rows to train on in {', '.join(paths)}", hint=HINTS[method])
    return Dataset.from_list(rows)


def _steps(row: dict, key: str, allow_empty: bool = False) -> list[str]:
    steps = row.get(key)
    if steps is None:
        raise ValueError(f"no {key!r}")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise ValueError(f"{key!r} must be a list of step texts")
    if not steps and not allow_empty:
        raise ValueError(f"{key!r} holds no step")
    if any(not s.strip() for s in steps):
        raise ValueError(f"{key!r} holds an empty step")
    return steps


def _prompt(row: dict) -> str:
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ValueError("no 'prompt' (the question text)")
    return row["prompt"]


def _label_row(row: dict) -> dict | None:
    """The row's prompt, steps and hard labels; None for a chain with no step (nothing to learn from)."""
    if row.get("completions") == [] and row.get("labels") == []:
        return None
    prompt, steps = _prompt(row), _steps(row, "completions")
    labels = row.get("labels")
    if labels is None:
        raise ValueError("no 'labels' (unlabeled: run `thinktime label` on it)")
    if not isinstance(labels, list) or not all(isinstance(x, bool) or x in (0, 1) for x in labels):
        raise ValueError("'labels' must be a list of true/false, one per step")
    if len(labels) != len(steps):
        raise ValueError(f"{len(labels)} labels for {len(steps)} completions (steps)")
    return {"prompt": prompt, "completions": steps, "labels": [bool(x) for x in labels]}


def _pair_row(row: dict) -> dict:
    prompt = _prompt(row)
    return {"prompt": prompt, "prefix": _steps(row, "prefix", allow_empty=True) if "prefix" in row else [],
            "chosen": _steps(row, "chosen"), "rejected": _steps(row, "rejected")}


def _labelled(row: dict, tokenizer) -> dict:
    ids, _, separators = encode_steps(tokenizer, row["prompt"], row["completions"], DEFAULT_DELIMITER)
    labels = [-100] * len(ids)
    for position, good in zip(separators, row["labels"]):
        labels[position] = int(good)
    return {"input_ids": ids, "labels": labels, "first": separators[0] + 1}


def _paired(row: dict, tokenizer) -> dict:
    def side(steps: list[str]) -> list[int]:
        ids, ends, _ = encode_steps(tokenizer, row["prompt"], row["prefix"] + steps, DEFAULT_DELIMITER)
        return ids[:ends[-1] + 1]  # up to the last step's last token, where the scorer reads the reward

    return {"chosen_ids": side(row["chosen"]), "rejected_ids": side(row["rejected"])}


def _refuse_too_long(lengths: list[int], max_length: int | None, method: str, what: str) -> None:
    """Refuse before training when no row would keep anything to train on within --max-length."""
    if max_length is not None and lengths and min(lengths) > max_length:
        raise BadInputError(f"no {method} training row fits --max-length ({max_length} tokens): {what} of the "
                            f"shortest takes {min(lengths)}", hint=f"raise --max-length, e.g. --max-length "
                                                               f"{max(lengths)}")


@dataclass
class PRMConfig(TrainingArguments):
    """transformers' TrainingArguments plus the two settings `training.train` gives TRL's configs."""

    max_length: int | None = 2048
    model_init_kwargs: dict | None = None


class PRMTrainer(Trainer):
    """A token-classification PRM on transformers' Trainer, with TRL's constructor (model name, peft_config)."""

    def __init__(self, model: str, args: PRMConfig, train_dataset, processing_class, peft_config=None):
        from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

        encoded = train_dataset.map(_labelled, fn_kwargs={"tokenizer": processing_class},
                                    remove_columns=train_dataset.column_names)
        _refuse_too_long(encoded["first"], args.max_length, "prm", "the first step")
        if args.max_length is not None:  # rows cut after their first label keep the labels before the cut
            encoded = encoded.filter(lambda row: row["first"] <= args.max_length).map(
                lambda row: {"input_ids": row["input_ids"][:args.max_length],
                             "labels": row["labels"][:args.max_length]})
        encoded = encoded.remove_columns("first")
        network = AutoModelForTokenClassification.from_pretrained(model, num_labels=2,
                                                                  **(args.model_init_kwargs or {}))
        network.config.pad_token_id = processing_class.pad_token_id
        if peft_config is not None:
            from peft import get_peft_model

            network = get_peft_model(network, peft_config)
        super().__init__(model=network, args=args, train_dataset=encoded, processing_class=processing_class,
                         data_collator=DataCollatorForTokenClassification(processing_class))


class PPMTrainer(RewardTrainer):
    """TRL's RewardTrainer on step pairs, tokenized in the scorer's layout before TRL sees them."""

    def __init__(self, model: str, args, train_dataset, processing_class, peft_config=None):
        encoded = train_dataset.map(_paired, fn_kwargs={"tokenizer": processing_class},
                                    remove_columns=train_dataset.column_names)
        _refuse_too_long([max(len(c), len(r)) for c, r in zip(encoded["chosen_ids"], encoded["rejected_ids"])],
                         args.max_length, "ppm", "the longer side")  # TRL drops pairs over it
        super().__init__(model=model, args=args, train_dataset=encoded, processing_class=processing_class,
                         peft_config=peft_config)


def trainer_for(method: str) -> tuple[type, type]:
    """(config class, trainer class) for prm or ppm, as `training.train` picks TRL's for the other methods."""
    from trl import RewardConfig

    return (PRMConfig, PRMTrainer) if method == "prm" else (RewardConfig, PPMTrainer)
