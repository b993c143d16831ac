"""The files a bootstrap round writes, in the formats TRL reads.

    sft.jsonl    {"messages": [system, user, assistant], "id", "round", "kind"}   SFTTrainer (conversational)
    pairs.jsonl  {"prompt": [system, user], "chosen": [assistant], "rejected": [assistant], "id", "round"}
                 DPOTrainer / RewardTrainer (conversational preference, explicit prompt)
    stats.json   the round's counts (see rounds.RoundStats)

The system message is the deep-thinking prompt the model is asked with (the same text as at
solve time), and the user message is the question without any hint: a rationalised rationale is
stored as the answer to the plain question. Extra keys (id, round, kind) are metadata; the trainers
read only the columns they need.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_row(prompt: Sequence[dict], rationale: str, **meta) -> dict:
    return {"messages": [dict(m) for m in prompt] + assistant(rationale), **meta}


def pair_row(prompt: Sequence[dict], chosen: str, rejected: str, **meta) -> dict:
    return {"prompt": [dict(m) for m in prompt], "chosen": assistant(chosen), "rejected": assistant(rejected), **meta}


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write all rows at once (a temporary file renamed into place: never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str | Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- views the trainers need -----------------------------------------------------------------

def to_prompt_completion(row: dict) -> dict:
    """An SFT chat row as TRL's conversational prompt-completion form (loss on the reply only)."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def as_scored(text: str) -> str:
    """A chain as the best-of-n strategy hands it to an outcome reward model: its steps (paragraphs),
    stripped, joined by blank lines."""
    from thinktime.strategies.steps import DEFAULT_DELIMITER, split_steps

    return DEFAULT_DELIMITER.join(split_steps(text, DEFAULT_DELIMITER)) or text


def without_system(row: dict) -> dict:
    """A preference row as the outcome reward model scorer (thinktime.scorers.reward_models.
    OutcomeRewardModel) reads a chain: [user, assistant], no system message, steps rejoined."""
    return {"prompt": [m for m in row["prompt"] if m["role"] != "system"],
            "chosen": assistant(as_scored(row["chosen"][0]["content"])),
            "rejected": assistant(as_scored(row["rejected"][0]["content"]))}
