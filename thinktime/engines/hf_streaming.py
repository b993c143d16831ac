"""What the transformers engine hands `generate` to stop and to stream: a cancel flag and stop strings as
stopping criteria, and a streamer that turns each step's tokens into per-sample text deltas."""
from __future__ import annotations

import threading

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from thinktime.engines.decode_rows import stop_window
from thinktime.types import StreamDelta


class CancelCriteria(StoppingCriteria):
    """Stops every sequence as soon as the caller sets the event (Ctrl-C, client gone)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class StopStrings(StoppingCriteria):
    """Stop strings for generate(), read in the generated tokens only. transformers' own `stop_strings` also
    match text that begins in the prompt (a step prefix ending in "\n" and a first token "\n" would meet
    "\n\n"), which the decoding loop never does; this keeps the two paths alike."""

    def __init__(self, stops, tokenizer, prompt_width: int):
        self.stops, self.tokenizer, self.width = tuple(stops), tokenizer, prompt_width
        self.window = stop_window(self.stops)  # as the decoding loop's: counted in bytes, not characters

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.width:]
        tails = self.tokenizer.batch_decode(new[:, -self.window:], skip_special_tokens=True)
        return torch.tensor([any(s in tail for s in self.stops) for tail in tails], device=input_ids.device)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without re-decoding the whole sequence.

    The prefix window (as in vLLM's detokenizer) keeps word-joining spaces right for sentencepiece
    tokenizers; a trailing U+FFFD means a multi-byte character is not complete yet, so we wait.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.sent = ""
        self.pending = ""
        self.stop = stop
        # Keep back the chars that might begin a stop string; once one appears, send nothing more
        # (a new occurrence always lies inside the unsent text, so it is never streamed).
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.pending += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if any(s in self.pending for s in self.stop):
            self.stopped = True
            return ""
        if self.hold_back:
            ready, self.pending = self.pending[: -self.hold_back], self.pending[-self.hold_back :]
        else:
            ready, self.pending = self.pending, ""
        self.sent += ready
        return ready

    def finish(self, final_text: str) -> str:
        """The rest of the final text; joined deltas always equal the final text."""
        if final_text.startswith(self.sent):
            rest = final_text[len(self.sent) :]
        else:  # cannot happen: stop strings are never streamed (see push)
            rest = ""
        self.sent += rest
        return rest


class QueueStreamer(BaseStreamer):
    """Receives each decoding step's tokens for the whole batch and queues per-sample text deltas."""

    def __init__(self, tokenizer, rows: int, stop_ids: set[int], emit, stop: tuple[str, ...]):
        self.decoders = [IncrementalDecoder(tokenizer, stop) for _ in range(rows)]
        self.done = [False] * rows
        self.stop_ids = stop_ids
        self.emit = emit
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands us the prompt ids
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids:
                self.done[row] = True
                continue
            delta = self.decoders[row].push(token)
            if delta:
                self.emit(StreamDelta(row, delta))

    def end(self) -> None:
        pass
