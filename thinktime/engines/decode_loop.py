"""A decoding loop over the model's own forward that drops finished rows, for the CPU.

`generate` keeps every row of a batch in every step until the last one ends: n samples of one
question, or a batch of eval questions, where one chain stops after 20 tokens and another runs to
256, pay for the long one in every row. On a GPU the wasted rows are nearly free; on a CPU each
row costs its share of every matrix product. This loop takes the finished rows out of the batch
(and out of the KV cache) as they end, so a step costs what the live rows need.

Everything else follows `generate`: the same forward (left padding, position ids from the
attention mask), eos and stop strings as `generate` applies them (fast.Rows), greedy argmax, or
temperature and top-p (transformers' TopPLogitsWarper) sampled by inverse CDF from a seeded
uniform per row and step, so a row's tokens do not depend on when other rows finish.
"""
from __future__ import annotations

import threading

import torch

from thinktime.engines import lean_step
from thinktime.engines.decode_ops import draw_uniforms, sample
from thinktime.engines.decode_rows import Rows
from thinktime.engines.token_logprobs import LogprobRows

TOP_P_CANDIDATES = 256  # top-p looks for its kept tokens among these first (fast.sample)


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, cache, cache_kwarg: str,
           max_new_tokens: int, greedy: bool, temperature: float, top_p: float, seed,
           stop_ids: set[int], pad_id: int, stop_strings=(), tokenizer=None, streamer=None,
           cancel: threading.Event | None = None, lean=None, first_logits: torch.Tensor | None = None,
           logprobs: LogprobRows | None = None) -> list[list[int]]:
    """New tokens per row, shaped as `generate` returns them (a stop id kept, then pad_id to a common
    length). `cache` may already hold the first positions of every row (a prefix cache). `lean` (a
    lean_step.LeanStep) runs the one-token steps over a shared-prefix cache instead of the model's forward.
    `first_logits` ([rows, vocab]): the cache holds every input position already and these are the logits
    after them (a prefilled prompt's), so the first tokens are sampled without a forward. `logprobs` records each
    token's log-probability from the same logits, and a row it finds unsure ends there (DeepConf's early stop)."""
    rows = input_ids.shape[0]
    cancel = cancel or threading.Event()
    state = Rows(rows, set(stop_ids), pad_id, tuple(stop_strings), tokenizer, streamer)
    if max_new_tokens <= 0:
        return state.padded()
    mode = "greedy" if greedy else ("top_p" if top_p < 1.0 else "sample")
    uniforms = draw_uniforms(seed, rows, max_new_tokens)
    if streamer is not None:
        streamer.put(input_ids[:1].cpu())  # as generate does, the prompt comes first
    device = input_ids.device
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    cached = cache.get_seq_length()
    live = torch.arange(rows)
    logits = first_logits if first_logits is not None else model(
        input_ids=input_ids[:, cached:], attention_mask=mask, position_ids=positions[:, cached:], use_cache=True,
        logits_to_keep=1, **{cache_kwarg: cache}).logits[:, -1]
    if lean is not None and not lean_step.serves(cache):
        lean = None
    shared = cache.layers[0].prefix_length if lean is not None else 0
    for step in range(max_new_tokens):
        tokens = sample(logits.float(), uniforms[live, step].to(device), mode, temperature, top_p,
                        candidates=TOP_P_CANDIDATES)
        every_row = torch.full((rows,), pad_id, dtype=torch.long)
        every_row[live] = tokens.cpu()
        unsure = logprobs.record(live.tolist(), logits, tokens) if logprobs is not None else ()
        state.push(every_row.tolist())
        for row in unsure:  # low confidence: the row leaves the batch as a finished one does
            state.done[row] = True
        state.all_done = all(state.done)
        if state.all_done or step + 1 == max_new_tokens or cancel.is_set():
            break
        keep = [i for i, row in enumerate(live.tolist()) if not state.done[row]]
        if len(keep) < len(live):  # rows ended: out of the batch and the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, tokens, live = mask[index], tokens[index], live[keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = mask.long().sum(-1, keepdim=True) - 1
        if lean is not None:
            own = mask[:, shared:]
            logits = lean(tokens[:, None], positions, cache, None if bool(own.all()) else own.bool()[:, None, None, :])
        else:
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                           **{cache_kwarg: cache}).logits[:, -1]
    if streamer is not None:
        streamer.end()
    return state.padded()
