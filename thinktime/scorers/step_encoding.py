"""How thinktime's own process reward models see a chain: one token layout for training and scoring.

The question is chat-formatted as the user turn (with the generation prompt), then each step's tokens
followed by the step delimiter's tokens form the assistant turn. Steps and delimiters are tokenized
apart, so a step ends at the same position whether or not more steps follow it: one forward pass
over a whole chain gives every prefix's score.

- PRM (token classification): a step's label and score sit on the last delimiter token after it.
- PPM (scalar head): a step's reward is read at its own last token, the end of the prefix it closes.

A trained folder holds REWARD_INFO: {"kind": "prm"|"ppm", "delimiter": ..., "base_model": ...}.
"""
from __future__ import annotations

import json
from pathlib import Path

from thinktime.errors import BadInputError

REWARD_INFO = "thinktime-reward.json"
KINDS = ("prm", "ppm")


def encode_steps(tokenizer, question: str, steps: list[str], delimiter: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the question and steps, each step's last token position and its delimiter's last position."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    separator = tokenizer(delimiter, add_special_tokens=False).input_ids
    ends, separators = [], []
    for step in steps:
        ids += tokenizer(step, add_special_tokens=False).input_ids
        ends.append(len(ids) - 1)
        ids += separator
        separators.append(len(ids) - 1)
    return ids, ends, separators


def write_reward_info(folder: Path, kind: str, delimiter: str, base_model: str) -> None:
    info = {"kind": kind, "delimiter": delimiter, "base_model": base_model}
    (Path(folder) / REWARD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_reward_info(folder: Path) -> dict | None:
    """The folder's REWARD_INFO, or None where it has none (not a thinktime-trained PRM/PPM)."""
    path = Path(folder) / REWARD_INFO
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("kind") not in KINDS or not isinstance(info.get("delimiter"), str):
        raise BadInputError(f"{path} does not say which reward model this is (kind {info.get('kind')!r})",
                            hint="a folder that `thinktime train prm|ppm` wrote says kind prm or ppm and a delimiter")
    return info
