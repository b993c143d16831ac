"""Which problems a run trains on and which it holds out (STaR, GRPO, step labels and tree search share the split).

The dataset's train split where it has one (gsm8k); otherwise its only split (arith, a file, math500).
The held-out problems are the last `eval_problems` of the set and never trained on; the training problems
are the first `train_problems` (any question also held out is dropped).
"""
from __future__ import annotations

import hashlib
import json

from thinktime.errors import BadInputError

PARTS = ("train", "heldout")


def training_split(dataset: str) -> str | None:
    """The dataset's train split where it has one (gsm8k): bootstrapping on its test split would leave a later
    `thinktime eval` of the trained model contaminated. None: the dataset's only split (arith, a file, math500)."""
    from thinktime.evaluation.datasets import SPECS

    spec = SPECS.get(dataset.strip().lower())
    return "train" if spec is not None and ("train" in spec.files or "train" in spec.hub) else None


def load_for_training(dataset: str, split: str | None, count: int, held_out: int, data_seed: int, hint: str):
    """The set's first count + held_out problems (its train split unless `split` names one), refused when short."""
    from thinktime.evaluation.datasets import load_dataset

    full = load_dataset(dataset, split=split if split is not None else training_split(dataset),
                        limit=count + held_out, data_seed=data_seed)
    if len(full) < count + held_out:
        raise BadInputError(f"{dataset} has {len(full)} problems; {count} for training and {held_out} held out need "
                            "more", hint=hint)
    return full


def training_problems(full, count: int, held_out: int) -> list:
    """The first `count` problems of `full`, none whose question is also among its last `held_out`."""
    held = {p.question for p in full.problems[len(full) - held_out:]} if held_out else set()
    return [p for p in full.problems[:count] if p.question not in held]


def split_problems(config):
    """(training problems, held-out Dataset): disjoint, the held-out ones from the end of the set.
    `config` names dataset, train_problems, eval_problems and data_seed (a bootstrap or GRPO setting)."""
    from thinktime.evaluation.datasets import Dataset

    if config.train_problems < 1 or config.eval_problems < 1:
        raise BadInputError("--train-problems and --eval-problems must be at least 1")
    full = load_for_training(config.dataset, None, config.train_problems, config.eval_problems, config.data_seed,
                             hint="lower --train-problems/--eval-problems")
    held = full.problems[len(full) - config.eval_problems:]
    train_set = training_problems(full, config.train_problems, config.eval_problems)
    heldout = Dataset(f"{full.name}-heldout", full.split, full.source, held, fingerprint(held))
    return train_set, heldout


def fingerprint(problems) -> str:
    return hashlib.sha256(json.dumps([[p.id, p.question, p.gold] for p in problems]).encode()).hexdigest()[:16]


def select_problems(dataset: str, part: str, train_problems: int, eval_problems: int, data_seed: int):
    """(dataset name, problems of `part`): the training problems, or the held-out ones, as bootstrap splits them."""
    data = part_dataset(dataset, part, train_problems, eval_problems, data_seed)
    return data.name.removesuffix(f"-{part}"), data.problems


def part_dataset(dataset: str, part: str, train_problems: int, eval_problems: int, data_seed: int,
                 limit: int | None = None):
    """The training or held-out problems as a Dataset of their own (named and fingerprinted by the part)."""
    from types import SimpleNamespace

    from thinktime.evaluation.datasets import Dataset

    if part not in PARTS:
        raise BadInputError(f"unknown --problems {part!r}", hint="use train or heldout")
    train, heldout = split_problems(SimpleNamespace(dataset=dataset, train_problems=train_problems,
                                                    eval_problems=eval_problems, data_seed=data_seed))
    problems = train if part == "train" else heldout.problems
    # fingerprinted whole, as load_dataset does: a run extended with a larger --limit is the same run
    return Dataset(heldout.name.removesuffix("-heldout") + f"-{part}", heldout.split, heldout.source,
                   problems[:limit], fingerprint(problems))
