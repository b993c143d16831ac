"""How the fast decoder runs a step: compiled kernels, CUDA graphs, and falling back from either.

A mixin of FastDecoder (engines/fast.py): it uses the decoder's _step, its buffers and its settings.
"""
from __future__ import annotations

import time
import warnings

import torch

try:
    from thinktime.engines.fast_support import FastPathUnavailable
except ImportError:  # loaded by file path (benchmarks/gpu_decode.py): fast.py put this folder on sys.path
    from fast_support import FastPathUnavailable


class CompiledSteps:
    """torch.compile of the per-layer pieces and CUDA graphs of whole steps, each turned off where it fails."""

    def _compile(self) -> None:
        try:
            import torch._dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # a few batch sizes and layers' variants
                if isinstance(getattr(torch._dynamo.config, name, None), int):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
            # emulate_precision_casts: fused kernels round where the eager ops would (bf16 after each op),
            # so compiled steps keep eager's numerics instead of drifting from generate's greedy tokens.
            import torch._inductor.config as inductor_config

            options = {"emulate_precision_casts": True} if self.cuda and \
                hasattr(inductor_config, "emulate_precision_casts") else None
            self._fns = {name: torch.compile(fn, fullgraph=True, dynamic=True if name == "softmax" else None,
                                             options=options)
                         for name, fn in self._eager.items()}
        except Exception as exc:  # an old torch or no compiler: eager kernels, still in graphs
            self._compile_failed(exc)

    def _compile_failed(self, exc: BaseException) -> None:
        self.compile_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        warnings.warn(f"thinktime fast decoding: torch.compile failed ({self.compile_error}); "
                      f"using eager kernels", RuntimeWarning, stacklevel=3)
        self.use_compile = False
        self._fns = dict(self._eager)
        self.graphs.clear()

    def _run_step(self, rows: int, window: int, mode: str) -> None:
        """One step without a graph. The first run of compiled kernels compiles them: a failure there turns
        compile off and the step runs again on eager kernels, as a failed capture does."""
        try:
            self._step(rows, window, mode)
        except torch.OutOfMemoryError:
            raise FastPathUnavailable("out of GPU memory for a step") from None
        except Exception as exc:
            if not self.use_compile:
                raise
            self._compile_failed(exc)
            self._step(rows, window, mode)

    def _runner(self, rows: int, window: int, mode: str):
        """A callable that runs one step: a replayed CUDA graph where possible, else the eager step."""
        if not self.use_graphs or mode in self.failed_modes:
            return lambda: self._run_step(rows, window, mode)
        key = (rows, window, mode)
        graph = self.graphs.get(key)
        if graph is None:
            started = time.perf_counter()
            try:
                graph = self._capture(rows, window, mode)
            except torch.OutOfMemoryError:  # not the step's fault: this call goes to generate, later ones retry
                self.graphs.clear()
                raise FastPathUnavailable("out of GPU memory while capturing a step") from None
            except Exception as exc:
                if not self.use_compile:
                    raise
                # Blame compile only if eager kernels then capture; otherwise compile stays on for other steps.
                fns = self._fns
                self._fns = dict(self._eager)
                try:
                    graph = self._capture(rows, window, mode)
                except Exception:
                    self._fns = fns
                    raise exc from None
                self._fns = fns
                self._compile_failed(exc)
            self.graphs[key] = graph
            self.stats["capture_s"] += time.perf_counter() - started
            self.stats["captures"] += 1
        return graph.replay

    def _capture(self, rows: int, window: int, mode: str):
        saved = self.tok[:rows].clone(), self.pos[:rows].clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: compiles, tunes, allocates outside the capture
            self._step(rows, window, mode)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.tok[:rows].copy_(saved[0])  # the warm-up step is undone; its KV writes are rewritten
        self.pos[:rows].copy_(saved[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._step(rows, window, mode)
        return graph

    def _capture_failed(self, mode: str, exc: BaseException) -> None:
        self.graph_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.failed_modes[mode] = self.graph_error
        self.graphs = {k: g for k, g in self.graphs.items() if k[2] != mode}
        if self.cuda:
            torch.cuda.synchronize(self.device)
