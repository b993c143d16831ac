"""The transformers engine's decoded rows as Completions: text up to the row's end, why it ended, the tokens it
used, and their log-probabilities."""
from __future__ import annotations

import threading

from thinktime.engines.token_logprobs import LogprobRows
from thinktime.types import Completion, SamplingParams


def completions(tokenizer, new_tokens: list[list[int]], prompt_lengths: list[int], params: SamplingParams,
                cancel: threading.Event, stop_ids: set[int], recorder: LogprobRows | None) -> list[list[Completion]]:
    """Each row's tokens as a Completion: text up to its end, why it ended, what it used."""
    completions: list[list[Completion]] = []
    for p, prompt_len in enumerate(prompt_lengths):
        row_completions = []
        for r in range(p * params.n, (p + 1) * params.n):
            row = new_tokens[r]
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            ids = row[:cut]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            stop_at = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            ended_turn = False
            if stop_at >= 0:  # stop strings are not part of the output (OpenAI semantics)
                text, finish, used = text[:stop_at], "stop", len(ids)
            elif cut < len(row):  # the model ended its turn; that token was generated too
                finish, used, ended_turn = "stop", len(ids) + 1, True
            else:  # cut: a multi-byte character may be cut in two, decoded as U+FFFD; it is not text
                finish, used = ("cancelled" if cancel.is_set() else "length"), len(ids)
                if recorder is not None and recorder.unsure[r]:
                    finish = "low_confidence"
                text = text.rstrip("\ufffd")
            entries = recorder.entries[r][:used] if recorder is not None else None
            row_completions.append(Completion(text, finish, int(prompt_len), used, ids, ended_turn, entries))
        completions.append(row_completions)
    return completions
