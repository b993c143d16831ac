"""One decoding step of a Llama-family model on the CPU, calling its layers' own pieces directly.

Why: a CPU decoding step of a small model is hundreds of small kernels, and what transformers
does around them on every call (keyword plumbing and decorators of each module, the causal-mask
construction, output capturing, hooks) was about a tenth of a step for SmolLM2 with 8 rows, and
the ~150 module calls of a step another few percent. For steps with one new token per row over a
shared-prefix cache (engines/shared_prefix.py), this runs the same math in the same order: the
model's own norm weights (LlamaRMSNorm's ops, checked bit for bit against the module), projections
(oneDNN-packed kernels, q/k/v and gate/up as one product each where onednn fused them), rotary
tables and MLP, the attention of shared_prefix, and writes into the same cache, so the logits are
the model's forward's, and the prompt still goes through the model's forward.

Only Llama-shaped decoders (fast.unsupported_reason accepts them, and no per-head q/k norms);
anything else keeps the model's forward.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from thinktime.engines.decode_ops import rms_norm
from thinktime.engines.fast_support import unsupported_reason
from thinktime.engines.onednn import PackedLinear, fused_product
from thinktime.engines.shared_prefix import SharedPrefixLayer, one_query_attention

# RMSNorm classes of the supported model types (fast.SUPPORTED_TYPES) that compute Llama's norm; each is
# also checked against its module on a random input before its plain function replaces the call.
_LLAMA_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "InternLM3RMSNorm"})


class _Layer(NamedTuple):
    """One decoder layer as the plain functions a step calls (see `plain`)."""
    input_norm: Callable
    qkv: Callable  # x -> the q, k and v projections side by side
    o_proj: Callable
    post_norm: Callable
    gate_up: Callable  # x -> the gate and up projections side by side
    down_proj: Callable


def plain(module: nn.Module) -> Callable:
    """What `module(x)` computes, as a plain function where that is cheaper to call: a packed linear's
    kernel, a Llama RMSNorm's ops (checked against the module: bit for bit, or the module stays); else
    the module. Why: nn.Module.__call__ costs a few microseconds, and a step makes ~150 such calls."""
    if type(module) is PackedLinear:
        return module.kernel()
    if type(module).__name__ in _LLAMA_NORMS and hasattr(module, "variance_epsilon"):
        weight, eps = module.weight, module.variance_epsilon
        function = lambda hidden: rms_norm(hidden, weight, eps)  # noqa: E731  (LlamaRMSNorm.forward, op for op)
        probe = torch.randn(2, 1, module.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(
            module.weight.dtype)
        with torch.inference_mode():
            if torch.equal(function(probe), module(probe)):
                return function
    return module


def _side_by_side(*modules: nn.Module) -> Callable:
    functions = [plain(module) for module in modules]
    return lambda x: torch.cat([function(x) for function in functions], dim=-1)


class LeanStep:
    """Logits [rows, vocab] for one new token per row, over a cache of SharedPrefixLayers."""

    def __init__(self, model):
        base = model.model
        self.embed, self.rotary = base.embed_tokens, base.rotary_emb
        self.norm, self.head = plain(base.norm), plain(model.lm_head)
        attention = base.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.heads = model.config.num_attention_heads
        self.kv_columns = model.config.num_key_value_heads * self.head_dim
        self.intermediate = base.layers[0].mlp.gate_proj.out_features
        self.layers = []
        for layer in base.layers[: model.config.num_hidden_layers]:
            attention, mlp = layer.self_attn, layer.mlp
            # Where pack_linears fused a layer's q/k/v or gate/up projections, one product serves them here.
            qkv = fused_product(attention.q_proj, attention.k_proj, attention.v_proj)
            gate_up = fused_product(mlp.gate_proj, mlp.up_proj)
            self.layers.append(_Layer(
                plain(layer.input_layernorm),
                qkv.linear.kernel() if qkv else _side_by_side(attention.q_proj, attention.k_proj, attention.v_proj),
                plain(attention.o_proj),
                plain(layer.post_attention_layernorm),
                gate_up.linear.kernel() if gate_up else _side_by_side(mlp.gate_proj, mlp.up_proj),
                plain(mlp.down_proj)))

    @staticmethod
    def unavailable_reason(model) -> str | None:
        reason = unsupported_reason(model)
        if reason is not None:
            return reason
        attention = model.model.layers[0].self_attn
        if hasattr(attention, "q_norm") or not hasattr(attention, "head_dim") or not hasattr(attention, "scaling"):
            return "attention other than Llama's (per-head norms, or no head_dim/scaling)"
        return None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, own_mask: torch.Tensor | None):
        """tokens and positions [rows, 1]; own_mask [rows, 1, 1, own positions] (bool) or None for no padding."""
        rows, dim, heads, kv_columns = tokens.shape[0], self.head_dim, self.heads, self.kv_columns
        hidden = self.embed(tokens)  # [rows, 1, hidden], as the model's forward has it
        cos, sin = self.rotary(hidden, positions)  # [rows, 1, dim]
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) = roll(x) * (-1 on the first half):
        # the sign moves onto sin, once a step, and the rotation is one roll (the same products, bit for bit).
        half = dim // 2
        cos, sin = cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)
        silu = nn.functional.silu  # unsupported_reason admits silu MLPs only
        for layer, layer_cache in zip(self.layers, cache.layers):
            projected = layer.qkv(layer.input_norm(hidden))  # [rows, 1, q | k | v]
            qk = projected[..., :-kv_columns].view(rows, 1, -1, dim)  # q and k heads, rotated together
            qk = ((qk * cos) + (qk.roll(half, -1) * sin)).transpose(1, 2)
            v = projected[..., -kv_columns:].view(rows, 1, -1, dim).transpose(1, 2)
            keys, values = layer_cache.update(qk[:, heads:], v)
            out = one_query_attention(layer_cache, qk[:, :heads], keys, values, own_mask, self.scaling)
            hidden = hidden + layer.o_proj(out.reshape(rows, 1, -1).contiguous())
            gate, up = layer.gate_up(layer.post_norm(hidden)).split(self.intermediate, dim=-1)
            hidden = hidden + layer.down_proj(silu(gate) * up)
        return self.head(self.norm(hidden))[:, -1]


def serves(cache) -> bool:
    return all(type(layer) is SharedPrefixLayer for layer in cache.layers)
