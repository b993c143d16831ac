"""Run a producer in a worker thread and consume what it emits as a plain iterator.

Streaming engines and Thinker.stream all work this way: the model (or a strategy) runs in a
thread and emits events; the caller iterates. When the caller stops early (Ctrl-C, a closed
connection) the `cancel` event is set and the worker joined, so generation stops with it; a stream
that runs to its end leaves the event unset. An exception in the worker is raised in the caller's
thread.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def iterate_in_thread(work: Callable[[Callable[[T], None]], None], cancel: threading.Event,
                      name: str = "thinktime-worker") -> Iterator[T]:
    events: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work(events.put)
        except BaseException as exc:  # surfaced in the consumer's thread
            failure.append(exc)
        finally:
            events.put(done)

    worker = threading.Thread(target=target, name=name, daemon=True)
    worker.start()
    finished = False
    try:
        while (event := events.get()) is not done:
            yield event
        finished = True
    finally:
        # Only a caller that stops early cancels: the same event often goes on to guard the caller's next
        # calls (a strategy's ctx.cancel), which a finished stream must leave as it found it.
        if not finished:
            cancel.set()
        worker.join()
    if failure:
        raise failure[0]
