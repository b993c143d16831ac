"""vLLM's data-parallel replicas: each a copy of the model in its own process, on its own slice of the GPUs.

vLLM's offline `LLM` refuses `data_parallel_size > 1` in one process, so the vLLM engine starts
`data_parallel_size` of these and deals each batch of prompts among them.
"""
from __future__ import annotations

import os
import threading
from dataclasses import replace

from thinktime.errors import BadInputError, EngineError, ThinktimeError
from thinktime.types import Completion, SamplingParams


def start_replicas(engine_cls, path: str, engine_kwargs: dict, size: int) -> list[_Replica]:
    """Every replica loads at once (each in its own process), then each is waited for; one failing closes all."""
    replicas = [_Replica(engine_cls, path, engine_kwargs, rank, size) for rank in range(size)]
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.close(timeout=5)
        raise
    return replicas


def generate_replicated(replicas: list[_Replica], prompts, params: SamplingParams, cancel) -> list[list[Completion]]:
    """Prompts dealt round-robin to the replicas. The caller holds one call at a time (a replica answers one
    generate at a time), and every replica's answer is read before an error is raised, so none is left in a
    pipe for the next call to take as its own."""
    shares = [list(range(len(prompts)))[r::len(replicas)] for r in range(len(replicas))]
    jobs = [(replica, share) for replica, share in zip(replicas, shares) if share]
    results: list[list[Completion] | None] = [None] * len(prompts)
    failure: BaseException | None = None
    stop = threading.Event()  # set by the caller's cancel, or by a replica's failure: all replicas stop
    either = _Either(cancel, stop)
    for replica, share in jobs:
        replica.send(("generate", [prompts[i] for i in share], _share_params(params, share)))
    for replica, share in jobs:
        try:
            for i, completions in zip(share, replica.receive(either)):
                results[i] = completions
        except ThinktimeError as exc:
            failure = failure or exc
            stop.set()  # the others stop too; their answers are still read
    if failure is not None:
        raise failure
    return results  # type: ignore[return-value]


def _share_params(params: SamplingParams, share: list[int]) -> SamplingParams:
    """A replica's sampling settings for its share of the prompts."""
    if params.seeds is not None:
        return replace(params, seeds=tuple(params.seeds[i] for i in share))
    if params.seed is not None:  # a prompt's stream follows its place in the call, not the replica's
        return replace(params, seeds=tuple(params.seed * 1_000_003 + i for i in share))
    return params


class _Either:
    """Set when any of its events is (the only method a replica's receive asks of a cancel event)."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)



class _Replica:
    """One data-parallel copy of the model in its own process, on its own slice of the GPUs."""

    def __init__(self, engine_cls, path: str, engine_kwargs: dict, rank: int, size: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        per_replica = int(engine_kwargs["tensor_parallel_size"]) * int(engine_kwargs["pipeline_parallel_size"])
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        pool = devices.split(",") if devices else [str(i) for i in range(per_replica * size)]
        visible = ",".join(pool[rank * per_replica : (rank + 1) * per_replica])
        self.process = ctx.Process(target=_replica_main, args=(child, engine_cls, path, engine_kwargs, visible),
                                   daemon=True, name=f"thinktime-vllm-dp{rank}")
        self.process.start()
        self.context_length: int | None = None

    def wait_ready(self) -> None:
        self.context_length = self.receive(None)

    def send(self, message) -> None:
        self.conn.send(message)

    def receive(self, cancel: threading.Event | None):
        while not self.conn.poll(0.1):
            if not self.process.is_alive():
                raise EngineError(f"a vLLM data-parallel replica exited (code {self.process.exitcode})")
            if cancel is not None and cancel.is_set():
                self.conn.send(("cancel",))
                cancel = None
        kind, payload = self.conn.recv()
        if kind == "error":  # (the exception's class name, its message)
            name, message = payload
            cls = BadInputError if name == "BadInputError" else EngineError
            raise cls(f"a vLLM data-parallel replica failed: {name}: {message}")
        return payload

    def close(self, timeout: float = 30) -> None:
        try:
            self.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.terminate()


def _replica_main(conn, engine_cls, path: str, engine_kwargs: dict, visible_devices: str) -> None:
    """A replica process: load the model on its devices, then answer generate requests until closed."""
    if visible_devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    try:
        engine = engine_cls(path, **engine_kwargs)
        conn.send(("ready", engine.context_length))
    except BaseException as exc:
        conn.send(("error", (type(exc).__name__, str(exc))))
        return
    while True:
        message = conn.recv()
        if message[0] == "close":
            engine.close()
            return
        if message[0] == "generate":
            cancel = threading.Event()
            result: list = []
            failure: list = []
            closing = False

            def work() -> None:
                try:
                    result.append(engine.generate(message[1], message[2], cancel))
                except BaseException as exc:
                    failure.append((type(exc).__name__, str(exc)))

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            while worker.is_alive():
                if conn.poll(0.1):
                    kind = conn.recv()[0]
                    if kind in ("cancel", "close"):  # a close during a generate ends it, then the replica
                        cancel.set()
                        closing = closing or kind == "close"
            conn.send(("done", result[0]) if result else ("error", failure[0] if failure else ("EngineError",
                                                                                             "no result")))
            if closing:
                engine.close()
                return
