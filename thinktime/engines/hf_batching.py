"""Continuous batching for the transformers engine: calls from several threads decode in one batch.

The server's clients call `generate` and `stream` at the same time. With continuous batching on, a
worker thread owns the decoding: a call's rows are prefilled on their own (after whatever the prefix
cache already holds of them), join the running batch between two steps (the batch's KV cache and
theirs left-padded to one width, which the attention mask hides), and leave it when they end. Each
call keeps its own sampling settings, seeded uniforms, stop strings, streamer and log-probabilities,
exactly as the decoding loop (engines/decode_loop.py) runs them for a call alone.
"""
from __future__ import annotations

import atexit
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from thinktime.engines.decode_ops import draw_uniforms, sample
from thinktime.engines.decode_rows import Rows
from thinktime.engines.token_logprobs import LogprobRows
from thinktime.errors import ThinktimeError
from thinktime.types import SamplingParams

TOP_P_CANDIDATES = 256  # as decode_loop: top-p looks for its kept tokens among these first


@dataclass(eq=False)
class Job:
    """One call's rows (each prompt repeated n times, left-padded together) and how to sample them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: object  # what the prefix cache already holds of these rows (a growing cache), maybe empty
    max_new: int
    mode: str  # "greedy", "sample" or "top_p"
    temperature: float
    top_p: float
    uniforms: torch.Tensor  # [rows, max_new]
    state: Rows
    recorder: LogprobRows | None
    cancel: threading.Event
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    logits: torch.Tensor | None = None  # after the prefill, for the first tokens

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


def job_for(input_ids, attention_mask, cache, params: SamplingParams, max_new: int, state: Rows,
            recorder: LogprobRows | None, cancel: threading.Event) -> Job:
    """A call's rows as the batcher decodes them: what decode_loop.decode would run for the call alone."""
    mode = "greedy" if params.greedy else ("top_p" if params.top_p < 1.0 else "sample")
    uniforms = draw_uniforms(list(params.seeds) if params.seeds else params.seed, input_ids.shape[0], max_new)
    return Job(input_ids, attention_mask, cache, max_new, mode, params.temperature, params.top_p, uniforms, state,
               recorder, cancel)


class Batcher:
    """The worker that decodes every admitted call's rows one token per step, first come first served."""

    def __init__(self, model, cache_kwarg: str, lock: threading.Lock, max_rows: int):
        self.model, self.cache_kwarg, self.lock, self.max_rows = model, cache_kwarg, lock, max_rows
        self.queue: deque[Job] = deque()
        self.owners: list[tuple[Job, int]] = []  # batch row -> (its call, its row there)
        self.cache, self.mask, self.logits = None, None, None
        self.stats = {"steps": 0, "most_rows": 0, "most_calls": 0}  # the largest batch seen, in rows and in calls
        self._wake = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="thinktime-batching", daemon=True)
        self._worker.start()
        atexit.register(self.close)  # a worker still in a torch call when the interpreter ends aborts the process

    def decode(self, job: Job) -> list[list[int]]:
        """The call's new tokens per row, shaped as decode_loop returns them (waits for the worker)."""
        if job.state.streamer is not None:
            job.state.streamer.put(job.input_ids[:1].cpu())  # as generate does, the prompt comes first
        with self._wake:
            if self._closing:
                raise ThinktimeError("this engine is closed", hint="create another engine")
            self.queue.append(job)
            self._wake.notify()
        job.done.wait()
        if job.state.streamer is not None:
            job.state.streamer.end()
        if job.error is not None:
            raise job.error
        return job.state.padded()

    def close(self) -> None:
        atexit.unregister(self.close)
        with self._wake:
            self._closing = True
            self._wake.notify()
        if threading.current_thread() is not self._worker:
            self._worker.join()

    # --- the worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.queue and not self.owners and not self._closing:
                    self._wake.wait()
                if self._closing:
                    break
            try:
                with self.lock, torch.inference_mode():
                    self._admit()
                    self._step()
            except Exception as exc:  # noqa: BLE001 - the batch's state is unknown: its calls fail, serving goes on
                self._fail_batch(exc)
        closed = ThinktimeError("this engine was closed during the call")
        self._fail_batch(closed)
        for job in self.queue:
            _finish(job, closed)

    def _fail_batch(self, error: BaseException) -> None:
        for job in {job for job, _ in self.owners}:
            _finish(job, error)
        self.owners, self.cache, self.mask, self.logits = [], None, None, None

    def _admit(self) -> None:
        """Calls that fit join the batch, their prompts prefilled; one that fails fails alone."""
        while True:
            with self._wake:
                if not self.queue or (self.owners and len(self.owners) + self.queue[0].rows > self.max_rows):
                    return
                job = self.queue.popleft()
            if job.cancel.is_set():
                _finish(job)
                continue
            try:
                self._prefill(job)
            except Exception as exc:  # noqa: BLE001 - a prompt the model refuses fails its own call only
                _finish(job, exc)
                continue
            self._join(job)

    def _prefill(self, job: Job) -> None:
        mask = job.attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        cached = job.cache.get_seq_length()
        job.logits = self.model(input_ids=job.input_ids[:, cached:], attention_mask=mask,
                                position_ids=positions[:, cached:], use_cache=True, logits_to_keep=1,
                                **{self.cache_kwarg: job.cache}).logits[:, -1]

    def _join(self, job: Job) -> None:
        if not self.owners:
            self.cache, self.mask, self.logits = job.cache, job.attention_mask, job.logits
        else:
            width = max(self.mask.shape[1], job.attention_mask.shape[1])
            for ours, theirs in zip(self.cache.layers, job.cache.layers):
                ours.keys = torch.cat([_left_pad(ours.keys, width), _left_pad(theirs.keys, width)])
                ours.values = torch.cat([_left_pad(ours.values, width), _left_pad(theirs.values, width)])
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(job.attention_mask, width)])
            self.logits = torch.cat([self.logits, job.logits])
        self.owners += [(job, row) for row in range(job.rows)]
        job.cache = job.logits = None  # the batch holds them now

    def _step(self) -> None:
        """Every live row's next token from the last logits; finished rows leave; the rest take one forward."""
        if not self.owners:
            return
        tokens = torch.empty(len(self.owners), dtype=torch.long)
        jobs = _by_job(self.owners)
        self.stats["steps"] += 1
        self.stats["most_rows"] = max(self.stats["most_rows"], len(self.owners))
        self.stats["most_calls"] = max(self.stats["most_calls"], len(jobs))
        for job, index in jobs.items():
            tokens[index] = self._sample(job, index)
        keep = [i for i, (job, row) in enumerate(self.owners) if not job.done.is_set() and not job.state.done[row]]
        if len(keep) < len(self.owners):
            self._select(keep)
        if not self.owners:
            self.cache = self.mask = self.logits = None
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.owners), 1)], dim=1)
        positions = self.mask.long().sum(-1, keepdim=True) - 1
        self.logits = self.model(input_ids=tokens[keep][:, None], attention_mask=self.mask, position_ids=positions,
                                 use_cache=True, **{self.cache_kwarg: self.cache}).logits[:, -1]

    def _sample(self, job: Job, index: list[int]) -> torch.Tensor:
        """This call's rows' tokens (index: their batch rows), pushed to its state; the call ends when all did."""
        state = job.state
        live = torch.tensor([row for j, row in (self.owners[i] for i in index)])
        logits = self.logits[index]
        step = state.steps
        chosen = sample(logits.float(), job.uniforms[live, step], job.mode, job.temperature, job.top_p,
                        candidates=TOP_P_CANDIDATES)
        every_row = torch.full((job.rows,), state.pad_id, dtype=torch.long)
        every_row[live] = chosen
        unsure = job.recorder.record(live.tolist(), logits, chosen) if job.recorder is not None else ()
        state.push(every_row.tolist())
        for row in unsure:  # low confidence: the row leaves the batch as a finished one does
            state.done[row] = True
        state.all_done = all(state.done)
        if state.all_done or step + 1 == job.max_new or job.cancel.is_set():
            _finish(job)
        return chosen

    def _select(self, keep: list[int]) -> None:
        self.owners = [self.owners[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        # columns no live row attends to any more (left padding of rows that left) are dropped
        start = int(self.mask.any(0).int().argmax())
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]


def _by_job(owners: list[tuple[Job, int]]) -> dict[Job, list[int]]:
    groups: dict[Job, list[int]] = {}
    for i, (job, _) in enumerate(owners):
        groups.setdefault(job, []).append(i)
    return groups


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the positions (dim -2 of keys and values, dim -1 of a mask) up to `width`."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _finish(job: Job, error: BaseException | None = None) -> None:
    job.error = job.error or error
    job.done.set()
