"""Continuous batching over one llama.cpp context: rows join the decoding batch between two steps and leave it
when they finish, whichever call they came from.

One worker thread owns the context. A call submits its prompts as Requests and waits; the worker
admits rows first come, first served while sequence slots and KV cells allow, prefills each prompt
once (its start copied from any sequence that already holds it: a cached system prompt, an earlier
step of the same chain, a sibling sample) in batches of its own before the step, copies it to its n rows,
and then decodes every live row one token per step. Finished rows stay in the KV cache
as cache entries (least recently used first out) so the next call that starts the same way prefills
only what is new.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from thinktime.engines.kv_ledger import KVLedger
from thinktime.engines.llamacpp_native import Native
from thinktime.engines.llamacpp_rows import Request, Row
from thinktime.errors import EngineError, ThinktimeError
from thinktime.types import TokenLogprob

# A prompt shared by several new requests (a batch's system prompt) is cached on its own first when at
# least this long: shorter ones cost less to prefill per row than to keep.
MIN_SHARED = 32
# New prompts are prefilled this many tokens per llama_decode, and each samples its first token as soon as its
# prompt is in: when many requests arrive at once, the first ones start streaming before the last are read.
PREFILL_TOKENS = 256
RESERVED_CELLS = 8  # kept free: llama.cpp rounds its buffers, and a ubatch must never find the cache full


class Scheduler:
    def __init__(self, native: Native, *, max_rows: int, cache_seqs: int, cache_cells: int):
        self.native = native
        self.max_rows = max_rows
        self.cache_seqs = cache_seqs
        self.cache_cells = cache_cells
        self.ledger = KVLedger()
        self.free_seqs = deque(range(max_rows + cache_seqs + 1))
        self.cached: dict[int, float] = {}  # cache entry seq -> last use
        self.live: list[Row] = []
        self.queue: deque[Request] = deque()  # the worker's, first come first served
        self.inbox: list[Request] = []  # submitted, not yet seen by the worker
        self._claimed = 0  # KV cells promised this round to prompts not yet prefilled
        self._wake = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="thinktime-llamacpp", daemon=True)
        self._worker.start()

    # --- what callers see -------------------------------------------------------------------------

    def submit(self, requests: list[Request]) -> None:
        with self._wake:
            if self._closing:
                raise ThinktimeError("this llama.cpp engine is closed", hint="create another engine")
            self.inbox.extend(requests)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if threading.current_thread() is not self._worker:
            self._worker.join()

    # --- the worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.inbox and not self.queue and not self.live and not self._closing:
                    self._wake.wait()
                if self._closing:
                    break
                self.queue.extend(self.inbox)
                self.inbox.clear()
            try:
                self._step(self._admit())
            except Exception as exc:  # the context's state is unknown: fail what was in it, serve on
                self._fail_all_live(exc)
        closed = ThinktimeError("this llama.cpp engine was closed during the call")
        self._fail_all_live(closed)
        for request in [*self.queue, *self.inbox]:
            request.fail(closed)
        self.native.close()

    def _fail_all_live(self, error: BaseException) -> None:
        for row in self.live:
            self.native.free_sampler(row.sampler)
            row.request.fail(error)
        self.live.clear()
        self.native.clear()
        self.ledger.clear()
        self.cached.clear()
        self.free_seqs = deque(range(self.max_rows + self.cache_seqs + 1))

    # --- admission --------------------------------------------------------------------------------

    def _free_cells(self) -> int:
        reserved = sum(row.remaining for row in self.live) + self._claimed
        return self.native.cells - RESERVED_CELLS - self.ledger.cells() - reserved

    def _admit(self) -> list[tuple[Request, list[Row], int]]:
        """Rows to start this step, first come, first served: (request, its new rows, tokens already held)."""
        self._finish_cancelled_queue()
        admitted, self._claimed = [], 0
        while self.queue:
            request = self.queue[0]
            rows = min(request.n - request.admitted, self.max_rows - len(self.live))
            if rows <= 0:
                break
            source, held = self._best_source(request.tokens)
            try:
                rows = self._rows_that_fit(request, rows, len(request.tokens) - held, source)
                if rows <= 0 and not self.live and source in self.cached:  # the cache entry itself is in the way
                    self._evict_seq(source)
                    source, held = None, 0
                    rows = self._rows_that_fit(request, 1, len(request.tokens), None)
            except EngineError as exc:  # this request can never fit: it fails, the others go on
                self.queue.popleft()
                request.fail(exc)
                continue
            if rows <= 0:
                break
            new = [self._new_row(request, request.admitted + k) for k in range(rows)]
            request.admitted += rows
            self._claimed += len(request.tokens) - held
            self._start_from(source, new[0].seq, held)
            admitted.append((request, new, held))
            self.live.extend(new)
            if request.admitted == request.n:
                self.queue.popleft()
        self._claimed = 0
        if len(admitted) > 1:
            self._share_common_start(admitted)
        return admitted

    def _finish_cancelled_queue(self) -> None:
        """Rows of cancelled requests that never started end here, as cancelled."""
        for request in [r for r in self.queue if r.cancelled]:
            self.queue.remove(request)
            for index in range(request.admitted, request.n):  # never started: no prompt was processed for them
                row = Row(request, index, None, None, self.native.piece, self.native.is_end_of_turn)
                row.cancel()
                request.finish_row(index, row.completion())

    def _rows_that_fit(self, request: Request, rows: int, own: int, source: int | None) -> int:
        need = lambda k: own + k * request.max_new  # noqa: E731 - the prompt once, each row its limit
        while self._free_cells() < need(rows) and self._evict(keep=source):
            pass
        while rows > 0 and self._free_cells() < need(rows):
            rows -= 1
        if rows == 0 and not self.live and source is None:
            raise EngineError(f"a prompt of {len(request.tokens)} tokens with {request.max_new} new tokens does "
                              f"not fit in the {self.native.cells} KV cells of this engine",
                              hint="raise --kv-cells, or ask for fewer new tokens")
        return rows

    def _best_source(self, tokens: list[int]) -> tuple[int | None, int]:
        """The sequence holding the longest start of `tokens` (leaving one to decode for logits), and its length."""
        best, best_len = None, 0
        limit = len(tokens) - 1
        for seq, entry in self.ledger.seqs.items():
            length = _common_length(entry.tokens, tokens, limit)
            if length > best_len:
                best, best_len = seq, length
        if best in self.cached:
            self.cached[best] = time.monotonic()
        return best, best_len

    def _new_row(self, request: Request, index: int) -> Row:
        sampler = self.native.sampler(greedy=request.greedy, temperature=request.temperature,
                                      top_p=request.top_p, seed=request.seeds[index])
        return Row(request, index, self._take_seq(), sampler, self.native.piece, self.native.is_end_of_turn)

    def _take_seq(self) -> int:
        while not self.free_seqs:
            if not self._evict():
                raise EngineError("no free llama.cpp sequence (all rows busy)")
        return self.free_seqs.popleft()

    def _start_from(self, source: int | None, seq: int, held: int) -> None:
        if source is not None and held:
            self.native.copy_sequence(source, seq, held)
            self.ledger.copy(source, seq, held)

    def _share_common_start(self, admitted) -> None:
        """Several new prompts that share a start no sequence holds (a batch's system prompt): prefill that
        start once in a cache entry and start every prompt from it."""
        starts = [request.tokens[:-1] for request, _, _ in admitted]
        common = _common_length(starts[0], starts[-1], len(starts[0]))
        for start in starts[1:-1]:
            common = _common_length(starts[0], start, common)
        if common < MIN_SHARED or all(held >= common for _, _, held in admitted):
            return
        seq = self._take_seq()
        source, held = self._best_source(starts[0][:common] + [-1])
        self._start_from(source, seq, held)
        self._prefill_only(seq, starts[0][held:common], held)
        self.cached[seq] = time.monotonic()
        for k, (request, rows, was_held) in enumerate(admitted):
            if was_held < common:
                self.native.truncate_sequence(rows[0].seq, 0)
                self.ledger.truncate(rows[0].seq, 0)
                self._start_from(seq, rows[0].seq, common)
                admitted[k] = (request, rows, common)

    def _prefill_only(self, seq: int, tokens: list[int], start: int) -> None:
        for at in range(0, len(tokens), self.native.batch_tokens):
            chunk = tokens[at: at + self.native.batch_tokens]
            self._decode(chunk, [start + at + i for i in range(len(chunk))], [seq] * len(chunk),
                         [False] * len(chunk))
            self.ledger.append(seq, chunk)

    # --- one step ---------------------------------------------------------------------------------

    def _step(self, new: list[tuple[Request, list[Row], int]]) -> None:
        """Live rows' next tokens and the new prompts' own tokens, in batches of at most batch_tokens; each
        batch's outputs sampled before the next overwrites them."""
        fresh = {id(row) for _, rows, _ in new for row in rows}
        for row in self.live:
            if id(row) not in fresh and row.request.cancelled:
                row.cancel()
        # New prompts go in batches of their own: a row's one-token step inside a long prefill batch runs other
        # kernels, whose sums round differently (a greedy near-tie would then depend on who else is served).
        prefill = []
        for request, rows, held in new:
            own = request.tokens[held:]
            prefill.extend((token, held + i, rows[0].seq, rows if i == len(own) - 1 else None)
                           for i, token in enumerate(own))
        self._run_items(prefill, PREFILL_TOKENS)
        self._run_items([(row.pending, len(self.ledger.tokens(row.seq)), row.seq, [row])
                         for row in self.live if id(row) not in fresh and row.finish is None])
        self._retire()

    def _run_items(self, items, size: int | None = None) -> None:
        size = min(size or self.native.batch_tokens, self.native.batch_tokens)
        for at in range(0, len(items), size):
            chunk = items[at: at + size]
            self._decode([t for t, _, _, _ in chunk], [p for _, p, _, _ in chunk], [s for _, _, s, _ in chunk],
                         [r is not None for _, _, _, r in chunk])
            self._record(chunk)
            self._sample(chunk)

    def _decode(self, tokens, positions, seqs, wants) -> None:
        while self.native.decode(tokens, positions, seqs, wants) == 1:  # no free cells: drop a cache entry
            if not self._evict():
                raise EngineError(f"llama.cpp ran out of its {self.native.cells} KV cells",
                                  hint="raise --kv-cells or lower --max-batch")

    def _record(self, chunk) -> None:
        """The ledger learns what each sequence now holds; a new prompt's rows copy its KV from the first."""
        by_seq: dict[int, list[int]] = {}
        for token, _, seq, _ in chunk:
            by_seq.setdefault(seq, []).append(token)
        for seq, tokens in by_seq.items():
            self.ledger.append(seq, tokens)
        for _, _, _, rows in chunk:
            if rows and len(rows) > 1:  # a new prompt's last token: its rows fork here
                length = len(self.ledger.tokens(rows[0].seq))
                for row in rows[1:]:
                    self.native.copy_sequence(rows[0].seq, row.seq, length)
                    self.ledger.copy(rows[0].seq, row.seq, length)

    def _sample(self, chunk) -> None:
        for index, (_, _, _, rows) in enumerate(chunk):
            for row in rows or ():
                if row.finish is None:
                    try:
                        token = self.native.sample(row.sampler, index)
                        row.take(token, None if row.request.logprobs is None else self._logprob(index, token, row))
                    except Exception as exc:  # this row's request fails; its neighbours decode on
                        row.request.fail(exc)
                        row.request.abort.set()
                        row.cancel()

    def _logprob(self, index: int, token: int, row: Row) -> TokenLogprob:
        native = self.native
        logprob, top = native.token_logprobs(index, token, row.request.logprobs)
        return TokenLogprob(token, native.token_string(token), logprob,
                            [(i, native.token_string(i), lp) for i, lp in top])

    def _retire(self) -> None:
        """Finished rows leave the batch; what they hold stays as a cache entry."""
        still = []
        for row in self.live:
            if row.finish is None:
                still.append(row)
                continue
            self.native.free_sampler(row.sampler)
            row.request.finish_row(row.index, row.completion())
            self.cached[row.seq] = time.monotonic()
        self.live = still
        self._trim_cache()

    # --- the cache --------------------------------------------------------------------------------

    def _trim_cache(self) -> None:
        while len(self.cached) > self.cache_seqs or (
                self.cached and self.ledger.cells(self.cached) > self.cache_cells):
            self._evict()

    def _evict(self, keep: int | None = None) -> bool:
        """Drop the least recently used cache entry (not `keep`); False when there is none."""
        candidates = [seq for seq in self.cached if seq != keep]
        if not candidates:
            return False
        self._evict_seq(min(candidates, key=self.cached.get))
        return True

    def _evict_seq(self, seq: int) -> None:
        del self.cached[seq]
        self.native.truncate_sequence(seq, 0)
        self.ledger.truncate(seq, 0)
        self.free_seqs.append(seq)


def _common_length(a: list[int], b: list[int], limit: int) -> int:
    limit = min(limit, len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low] and a[:high] != b[:high]: halve the gap
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low

