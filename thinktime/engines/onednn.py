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

import warnings

import torch
from torch import nn

from thinktime.engines.decode_rows import env_flag

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

    def kernel(self):
        """forward as a plain function, for loops that call it hundreds of times a step (no module call)."""
        op, packed, bias = torch.ops.mkldnn._linear_pointwise, self.packed, self.bias
        return lambda x: op(x, packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed {self.dtype}"


# Projections a decoder layer applies to one input one after another (Llama-family attention and
# MLP): packed as one matrix, so one product replaces three or two. For SmolLM2's 8-row decoding
# steps in bf16 the q/k/v and gate/up products of 30 layers took 6.4-7.0 ms apart, 5.2-5.4 ms fused
# (the k and v products, 576x192, are too small to use the memory bandwidth alone).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProduct:
    """One packed product for several projections of the same input. `linear` computes all of them;
    modules that call the projections one by one get them through `slice_for`, which computes the
    product at the first call and hands the others its columns."""

    def __init__(self, linears: list[nn.Linear]):
        weight = torch.cat([linear.weight.detach() for linear in linears])
        bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
        fused = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                   dtype=weight.dtype)  # no random init of weights overwritten at once
        with torch.no_grad():
            fused.weight.copy_(weight)
            if bias is not None:
                fused.bias.copy_(bias)
        self.linear = PackedLinear(fused)
        self.sizes = [linear.out_features for linear in linears]
        self._input = self._output = None
        self._version: int | None = None
        self._served: set[int] = set()

    def slice_for(self, part: int, x: torch.Tensor) -> torch.Tensor:
        # Valid while x is the same tensor object, unchanged in place (its version counter, where it has
        # one: inference tensors do not) and this part has not been served from it yet. Anything else
        # recomputes: a model that calls the parts on different inputs is slower, never wrong.
        version = _version(x)
        if x is not self._input or version != self._version or part in self._served:
            self._input, self._version, self._served = x, version, set()
            self._output = self.linear(x)
        self._served.add(part)
        out = self._output
        if len(self._served) == len(self.sizes):  # every part served: hold no tensors between calls
            self._input = self._output = None
        return out


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # an inference tensor
        return None


class PackedPart(nn.Module):
    """One projection of a fused group: its columns of the group's product."""

    def __init__(self, product: FusedProduct, part: int):
        super().__init__()
        self.product, self.part = product, part
        self.start = sum(product.sizes[:part])
        self.in_features, self.out_features = product.linear.in_features, product.sizes[part]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product.slice_for(self.part, x)[..., self.start:self.start + self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, part {self.part} of a fused "
                f"oneDNN-packed {self.product.linear.dtype} product")


def fused_product(*parts: nn.Module) -> FusedProduct | None:
    """The product these modules are the parts of, in this order, or None."""
    if not all(type(part) is PackedPart for part in parts):
        return None
    product = parts[0].product
    ok = all(part.product is product and part.part == i for i, part in enumerate(parts)) and len(parts) == len(
        product.sizes)
    return product if ok else None


def _fuse_groups(model: nn.Module) -> int:
    """Replaces each FUSED_GROUPS set of nn.Linear children (same input size, dtype and bias kind) with the
    PackedParts of one FusedProduct; returns how many linears it replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for names in FUSED_GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears) or len(
                    {(linear.in_features, linear.weight.dtype, linear.bias is None) for linear in linears}) != 1:
                continue
            product = FusedProduct(linears)
            for part, name in enumerate(names):
                setattr(parent, name, PackedPart(product, part))
            replaced += len(linears)
    return replaced


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def unavailable_reason(model: nn.Module) -> str | None:
    """Why the packed path cannot serve this model here, or None when it can."""
    if not env_flag("THINKTIME_ONEDNN", True):
        return "THINKTIME_ONEDNN=0"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN linear kernels"
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu":
        return "the model is not on the CPU"
    if parameter.dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN packing is used for fp32 and bf16 only, not {parameter.dtype}"
    return None


def pack_linears(model: nn.Module, fuse: bool = True) -> int:
    """Swaps every nn.Linear of an inference model for a PackedLinear, or with `fuse` the q/k/v and gate/up
    projections for PackedParts of one product each; returns how many linears it swapped.

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
        fused = _fuse_groups(model) if fuse else 0
        targets = [(parent, name, child) for parent, name, child in targets if getattr(parent, name) is child]
        for parent, name, child in targets:
            setattr(parent, name, PackedLinear(child))
    return fused + len(targets)


def _check(linear: nn.Linear) -> None:
    with torch.no_grad():
        x = torch.randn(3, linear.in_features, dtype=linear.weight.dtype)
        want = nn.functional.linear(x, linear.weight, linear.bias).float()
        got = PackedLinear(linear)(x).float()
    tolerance = 1e-3 if linear.weight.dtype == torch.float32 else 5e-2
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max()):
        raise RuntimeError("its output differs from F.linear")
