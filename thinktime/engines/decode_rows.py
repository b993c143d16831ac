"""The CPU side of a decoding call: each row's tokens, stop ids and stop strings, the streamer; and the
switches the decoders read from the environment. Needs only torch."""
from __future__ import annotations

import os

import torch


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if value == "" else value not in ("0", "false", "no", "off")


def stop_window(stop_strings) -> int:
    """How many of a row's last tokens can hold a stop string: one of b UTF-8 bytes lies within the last b
    tokens (a Chinese character or an emoji can take a token per byte), plus a few for a token that straddles
    its start."""
    return max((len(s.encode("utf-8")) for s in stop_strings), default=0) + 4


class Rows:
    """The CPU side of a call: each row's tokens, stop ids and stop strings, the streamer."""

    def __init__(self, rows, stop_ids, pad_id, stop_strings, tokenizer, streamer):
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.stop_ids, self.pad_id = stop_ids, pad_id
        self.stop_strings, self.tokenizer, self.streamer = stop_strings, tokenizer, streamer
        self.window = stop_window(stop_strings)
        self.all_done = False
        self.steps = 0

    def push(self, tokens: list[int]) -> None:
        self.steps += 1
        shown = []
        for row, token in enumerate(tokens):
            if self.done[row]:
                shown.append(self.pad_id)
                continue
            self.ids[row].append(token)
            shown.append(token)
            if token in self.stop_ids:
                self.done[row] = True
            elif self.stop_strings:
                tail = self.tokenizer.decode(self.ids[row][-self.window:], skip_special_tokens=True)
                if any(s in tail for s in self.stop_strings):
                    self.done[row] = True
        if self.streamer is not None:
            self.streamer.put(torch.tensor(shown))
        self.all_done = all(self.done)

    def padded(self) -> list[list[int]]:
        return [ids + [self.pad_id] * (self.steps - len(ids)) for ids in self.ids]
