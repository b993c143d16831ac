"""Linear layers run by oneDNN with weights packed once, for decoding on the CPU.

Why: PyTorch's CPU builds send an fp32 `F.linear` to MKL, whose kernels for the skinny products of
decoding (a few rows times a weight matrix) reach about a third of the speed of oneDNN's with the
weight already reordered into its blocked layout; on an AMD EPYC (Zen 5) a 576x1536 product for 8
rows takes 168 us through MKL and 62 us packed, the 49152-row LM head 13.3 ms and 3.2 ms. This is
the same kernel torch.compile's CPU freezing pass picks, without compiling anything (no warm-up, so
the cold start stays short). bf16 gains less (oneDNN already runs it) but still gains.

The packed weight replaces the module's parameter, so no memory is duplicated, except for an LM
head tied to the input embeddings: the embedding table stays as it is and the head gets its packed
copy. Outputs differ from MKL's in the last bits (another summation order), as any other kernel's.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

# The reorder takes the number of rows it should be best for; decoding n samples is the hot path.
_ROWS_HINT = 8


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight oneDNN has reordered for its own kernels."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed {self.dtype}"


def unavailable_reason(model: nn.Module) -> str | None:
    """Why the packed path cannot serve this model here, or None when it can."""
    if os.environ.get("THINKTIME_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return "THINKTIME_ONEDNN=0"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN linear kernels"
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu":
        return "the model is not on the CPU"
    if parameter.dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN packing is used for fp32 and bf16 only, not {parameter.dtype}"
    return None


def pack_linears(model: nn.Module) -> int:
    """Swaps every nn.Linear of an inference model for a PackedLinear; returns how many it swapped.

    Checks the first swap against F.linear and leaves the model untouched (with a warning) when the
    kernel is missing or wrong on this machine, so a torch build without it only loses speed.
    """
    reason = unavailable_reason(model)
    if reason is not None:
        return 0
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    if not targets:
        return 0
    try:
        _check(targets[0][2])
    except Exception as exc:  # noqa: BLE001 - any failure here only means "stay on F.linear"
        warnings.warn(f"thinktime: oneDNN linear kernels unusable here ({exc}); using the default ones",
                      RuntimeWarning, stacklevel=2)
        return 0
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, PackedLinear(child))
    return len(targets)


def _check(linear: nn.Linear) -> None:
    with torch.no_grad():
        x = torch.randn(3, linear.in_features, dtype=linear.weight.dtype)
        want = nn.functional.linear(x, linear.weight, linear.bias).float()
        got = PackedLinear(linear)(x).float()
    tolerance = 1e-3 if linear.weight.dtype == torch.float32 else 5e-2
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max()):
        raise RuntimeError("its output differs from F.linear")
