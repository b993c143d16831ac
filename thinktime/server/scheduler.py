"""One engine, many clients: a bounded FIFO queue, micro-batching, cancellation.

The engine runs one generate at a time (its RNG seed is per call), so one worker thread owns it.
Requests wait in a first-come-first-served queue; when the worker takes a job that can be batched
(a non-streaming single-chain request), it also takes every queued job with compatible sampling
parameters, up to the engine's batch rows, and runs them as one `engine.generate` call: the rows
decode together, so N clients cost little more than one. Streaming requests and multi-chain
strategies run alone, in their turn. A full queue refuses new work (the server answers 429 with
Retry-After); a job whose client has gone or whose deadline has passed is cancelled: skipped if it
is still queued, stopped at the next token if it is running (a batch stops when all its clients are
gone).

An engine that batches continuously (`engine.continuous_batching`: the llama.cpp engine, and the
transformers engine on a CPU, which the scheduler switches to it while it serves) takes calls from many threads and decodes them in one batch, rows joining and leaving between steps: there the
queue feeds up to `max_batch` workers, one job each, streams and seeded requests included, and the
engine's own first-come-first-served admission does the batching.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from thinktime.engines.base import Engine
from thinktime.types import Prompt, SamplingParams


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """A unit of work. Batchable jobs carry a prompt and params; others carry `run(cancel)`."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    prompt: Prompt | None = None
    params: SamplingParams | None = None
    run: Callable[[threading.Event], Any] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    # Set when the client left or ran out of time (or the server closed): the job counts as cancelled, not
    # served. The cancel flag alone cannot say so: a finished stream sets it too, to stop its worker.
    withdrawn: bool = False

    @property
    def batch_key(self) -> Hashable | None:
        if self.run is not None or self.params is None:
            return None
        p = self.params
        # A seed fixes the RNG for the whole call, so seeded sampling runs alone. Greedy requests with a seed
        # run alone too: batched rows are padded or share a prefix cache, whose sums round in another order,
        # which can flip a near-tie; alone, the same request gives the same text whatever else is served.
        if p.seed is not None:
            return None
        return (p.max_new_tokens, p.temperature if not p.greedy else 0.0, p.top_p if not p.greedy else 1.0,
                p.n, p.stop)

    def resolve(self, value: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(value)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


class _AllCancelled:
    """A cancel flag for a batch: generation stops only when every client in it has gone."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(job.cancel.is_set() for job in self.jobs)

    def set(self) -> None:
        for job in self.jobs:
            job.cancel.set()


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int = 64, max_batch: int | None = None,
                 batch_wait: float = 0.02):
        self.engine = engine
        self.max_queue = max_queue
        self.max_batch = max_batch or getattr(engine, "max_batch_rows", 16)
        self.batch_wait = batch_wait
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running: list[Job] = []
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0, "engine_calls": 0,
                      "batched_requests": 0, "largest_batch": 0}
        self._job_seconds = 2.0  # running mean of a job's time, for Retry-After
        # The transformers engine batches continuously while it serves (its CPU decoding loop), the llama.cpp one always.
        start = getattr(engine, "start_continuous_batching", None)
        self._started_batching = bool(start(self.max_batch)) if callable(start) else False
        self.concurrent = bool(getattr(engine, "continuous_batching", False))
        self._workers = [threading.Thread(target=self._loop, name=f"thinktime-scheduler-{i}", daemon=True)
                         for i in range(self.max_batch if self.concurrent else 1)]
        for worker in self._workers:
            worker.start()

    # --- the client side (event loop) --------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._queue) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._cond.notify()
        return job

    def withdraw(self, job: Job) -> None:
        """The client is gone or out of time: drop the job if queued, stop it if running."""
        job.withdrawn = True
        job.cancel.set()
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running or finished: the cancel flag stops it
            self.stats["cancelled"] += 1
        job.resolve(error=asyncio.CancelledError())

    def retry_after(self) -> int:
        waiting = len(self._queue) + len(self.running)
        return max(1, min(120, round(self._job_seconds * waiting / len(self._workers))))

    @property
    def queued(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending + self.running:
            job.withdrawn = True
            job.cancel.set()
        for job in pending:
            job.resolve(error=RuntimeError("the server is shutting down"))
        deadline = time.monotonic() + 30
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._started_batching:
            self.engine.stop_continuous_batching()

    # --- the worker side ---------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            head = self._queue.popleft()
            key = head.batch_key
            if key is None or self.concurrent:  # the engine batches what runs at once itself
                return [head]
        # Requests that arrive together (a burst of clients) land within a few milliseconds.
        if self.batch_wait and not self.running:
            time.sleep(self.batch_wait)
        with self._cond:
            rows = head.params.n
            group = [head]
            for job in list(self._queue):
                if job.batch_key == key and rows + job.params.n <= self.max_batch:
                    self._queue.remove(job)
                    group.append(job)
                    rows += job.params.n
            return group

    def _count(self, **changes: int) -> None:
        """Add to the stats (several workers update them at once where the engine batches continuously)."""
        with self._cond:
            for key, value in changes.items():
                self.stats[key] += value

    def _loop(self) -> None:
        while (group := self._take()) is not None:
            live = [job for job in group if not job.cancel.is_set()]
            for job in group:
                if job.cancel.is_set():
                    self._count(cancelled=1)
                    job.resolve(error=asyncio.CancelledError())
            if not live:
                continue
            with self._cond:
                self.running = self.running + live
            started = time.monotonic()
            for job in live:
                job.started = started
            try:
                if live[0].run is not None:
                    results = [live[0].run(live[0].cancel)]
                else:
                    with self._cond:
                        self.stats["engine_calls"] += 1
                        self.stats["batched_requests"] += len(live)
                        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
                    results = self.engine.generate([job.prompt for job in live], live[0].params,
                                                   _AllCancelled(live))
            except BaseException as exc:  # reported to each client; the worker keeps serving
                self._count(failed=len(live))
                for job in live:
                    job.resolve(error=exc)
            else:
                for job, result in zip(live, results):
                    self._count(**{"cancelled" if job.withdrawn else "served": 1})
                    job.resolve(result)
            finally:
                with self._cond:
                    self.running = [job for job in self.running if job not in live]
                    self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - started)
