"""One decoder layer's weights as the fast decoder reads them: q/k/v and gate/up fused into one matrix each."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    eps1: float
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    qn: torch.Tensor | None
    kn: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2: torch.Tensor
    eps2: float
    gu_w: torch.Tensor
    gu_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None


def norm_eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def fuse(linears, attr: str):
    """One matrix (or bias) holding the linears' rows; each linear's own parameter becomes a view into it,
    so the model's forward (and `generate`) reads the same memory and nothing is duplicated."""
    parts = [getattr(m, attr) for m in linears]
    if parts[0] is None:
        return None
    key = f"_thinktime_fused_{attr}"
    fused = getattr(linears[0], key, None)
    if fused is not None:  # fused already (a second decoder on the same model): reuse it if still aliased
        offset = 0
        for p in parts:
            if p.data_ptr() != fused[offset:].data_ptr() or p.shape[1:] != fused.shape[1:]:
                break
            offset += p.shape[0]
        else:
            if offset == fused.shape[0]:
                return fused
    fused = torch.cat([p.detach() for p in parts], dim=0)
    offset = 0
    for module, p in zip(linears, parts):
        rows = p.shape[0]
        setattr(module, attr, torch.nn.Parameter(fused[offset:offset + rows], requires_grad=p.requires_grad))
        offset += rows
    object.__setattr__(linears[0], key, fused)  # a plain attribute, not a parameter or buffer
    return fused


def layer_weights(layer) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    gu = [mlp.gate_proj, mlp.up_proj]
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return LayerWeights(
        ln1=layer.input_layernorm.weight, eps1=norm_eps(layer.input_layernorm),
        qkv_w=fuse(qkv, "weight"), qkv_b=fuse(qkv, "bias"),
        qn=q_norm.weight if q_norm is not None else None, kn=k_norm.weight if k_norm is not None else None,
        o_w=attn.o_proj.weight, o_b=attn.o_proj.bias,
        ln2=layer.post_attention_layernorm.weight, eps2=norm_eps(layer.post_attention_layernorm),
        gu_w=fuse(gu, "weight"), gu_b=fuse(gu, "bias"),
        down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
    )
