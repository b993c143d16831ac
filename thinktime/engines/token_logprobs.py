"""Each generated token's log-probability and its most likely alternatives, from the logits of a torch decode.

The transformers engine's decoding loop and `generate` give raw logits per step; this turns them into
Completion.logprobs (the model's own distribution, before temperature and top-p, as llama.cpp's and
OpenAI's are), and ends a row whose running DeepConf confidence falls below SamplingParams.stop_below.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from thinktime.confidence import RunningGroup
from thinktime.types import SamplingParams, TokenLogprob

class LogprobRows:
    """Per row of a decode: the entries of its tokens so far, and whether its confidence fell below the threshold."""

    def __init__(self, rows: int, params: SamplingParams, text_of: Callable[[int], str]):
        self.top = params.logprobs or 0
        self.entries: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self.stop_below = params.stop_below
        self.groups = [RunningGroup(params.stop_below[0]) for _ in range(rows)] if params.stop_below else None
        self.unsure = [False] * rows
        self._text_of, self._texts = text_of, {}

    def record(self, rows: list[int], logits: torch.Tensor, tokens: torch.Tensor) -> list[int]:
        """Adds each row's token (logits[i] chose tokens[i] for rows[i]); the rows that have just become unsure."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs.gather(1, tokens.view(-1, 1).to(logprobs.device))[:, 0].tolist()
        if self.top:
            values, ids = logprobs.topk(self.top, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [[] for _ in rows]
        unsure = []
        for row, token, logprob, top in zip(rows, tokens.view(-1).tolist(), chosen, tops):
            entry = TokenLogprob(token, self._text(token), logprob, [(i, self._text(i), v) for i, v in top])
            self.entries[row].append(entry)
            if self.groups is not None and not self.unsure[row]:
                mean = self.groups[row].push(entry.top)
                if mean is not None and mean < self.stop_below[1]:
                    self.unsure[row] = True
                    unsure.append(row)
        return unsure

    def _text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self._text_of(token)
        return self._texts[token]


def record_generated(recorder: LogprobRows, step_logits, tokens: list[list[int]], stop_ids: set[int]) -> list[int]:
    """`generate`'s output_logits replayed through the recorder, each row up to its end (a stop id, or where its
    confidence fell below the threshold): how many tokens each row keeps."""
    rows = len(tokens)
    lengths = [len(row) for row in tokens]
    ended = [False] * rows
    for step, logits in enumerate(step_logits):
        live = [r for r in range(rows) if not ended[r] and step < len(tokens[r])]
        if not live:
            break
        chosen = torch.tensor([tokens[r][step] for r in live])
        unsure = recorder.record(live, logits[live], chosen)
        for r in live:
            if tokens[r][step] in stop_ids or r in unsure:
                ended[r] = True
                lengths[r] = step + 1
    return lengths
