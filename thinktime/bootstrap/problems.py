"""Which problems a run trains on and which it holds out (STaR and GRPO share the split).

The dataset's train split where it has one (gsm8k); otherwise its only split (arith, a file, math500).
The held-out problems are the last `eval_problems` of the set and never trained on; the training problems
are the first `train_problems` (any question also held out is dropped).
"""
from __future__ import annotations

import hashlib
import json

from thinktime.errors import BadInputError


def training_split(dataset: str) -> str | None:
    """The dataset's train split where it has one (gsm8k): bootstrapping on its test split would leave a later
    `thinktime eval` of the trained model contaminated. None: the dataset's only split (arith, a file, math500)."""
    from thinktime.evaluation.datasets import SPECS

    spec = SPECS.get(dataset.strip().lower())
    return "train" if spec is not None and ("train" in spec.files or "train" in spec.hub) else None


def split_problems(config):
    """(training problems, held-out Dataset): disjoint, the held-out ones from the end of the set.
    `config` names dataset, train_problems, eval_problems and data_seed (a bootstrap or GRPO setting)."""
    from thinktime.evaluation.datasets import Dataset, load_dataset

    if config.train_problems < 1 or config.eval_problems < 1:
        raise BadInputError("--train-problems and --eval-problems must be at least 1")
    full = load_dataset(config.dataset, split=training_split(config.dataset),
                        limit=config.train_problems + config.eval_problems, data_seed=config.data_seed)
    if len(full) < config.train_problems + config.eval_problems:
        raise BadInputError(f"{config.dataset} has {len(full)} problems; {config.train_problems} for training and "
                            f"{config.eval_problems} held out need more", hint="lower --train-problems/--eval-problems")
    held = full.problems[len(full) - config.eval_problems:]
    held_questions = {p.question for p in held}
    train_set = [p for p in full.problems[:config.train_problems] if p.question not in held_questions]
    fingerprint = hashlib.sha256(json.dumps([[p.id, p.question, p.gold] for p in held]).encode()).hexdigest()[:16]
    heldout = Dataset(f"{full.name}-heldout", full.split, full.source, held, fingerprint)
    return train_set, heldout
