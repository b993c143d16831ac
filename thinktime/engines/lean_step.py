"""One decoding step of a Llama-family model on the CPU, calling its layers' own pieces directly.

Why: a CPU decoding step of a small model is hundreds of small kernels, and what transformers
does around them on every call (keyword plumbing and decorators of each module, the causal-mask
construction, output capturing, hooks) was about a tenth of a step for SmolLM2 with 8 rows. For
steps with one new token per row over a shared-prefix cache (engines/shared_prefix.py), this runs
the same modules' math in the same order: the model's own norm, projection (oneDNN-packed, q/k/v
and gate/up as one product each where onednn fused them) and MLP modules, its rotary-embedding module, the attention of shared_prefix, and writes into the
same cache, so the logits are the model's forward's, and the prompt still goes through the
model's forward.

Only Llama-shaped decoders (fast.unsupported_reason accepts them, and no per-head q/k norms);
anything else keeps the model's forward.
"""
from __future__ import annotations

import torch

from thinktime.engines.fast import unsupported_reason
from thinktime.engines.onednn import fused_product
from thinktime.engines.shared_prefix import SharedPrefixLayer, one_query_attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanStep:
    """Logits [rows, vocab] for one new token per row, over a cache of SharedPrefixLayers."""

    def __init__(self, model):
        base = model.model
        self.embed, self.rotary, self.norm, self.head = base.embed_tokens, base.rotary_emb, base.norm, model.lm_head
        self.layers = list(base.layers[: model.config.num_hidden_layers])
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.heads = model.config.num_attention_heads
        # Where pack_linears fused a layer's q/k/v or gate/up projections, one product serves them here.
        self.fused = [(fused_product(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                       fused_product(layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in self.layers]

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
        rows = tokens.shape[0]
        hidden = self.embed(tokens)  # [rows, 1, hidden], as the model's forward has it
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, layer_cache, (qkv, gate_up) in zip(self.layers, cache.layers, self.fused):
            attention, mlp = layer.self_attn, layer.mlp
            residual = hidden
            x = layer.input_layernorm(hidden)
            if qkv is not None:  # q and k are adjacent columns of one product: rotated together
                out = qkv.linear(x)
                qk = out[..., :-qkv.sizes[2]].view(rows, 1, -1, self.head_dim).transpose(1, 2)
                qk = (qk * cos) + (_rotate_half(qk) * sin)
                q, k = qk[:, :self.heads], qk[:, self.heads:]
                v = out[..., -qkv.sizes[2]:].view(rows, 1, -1, self.head_dim).transpose(1, 2)
            else:
                q, k, v = (projection(x).view(rows, 1, -1, self.head_dim).transpose(1, 2)
                           for projection in (attention.q_proj, attention.k_proj, attention.v_proj))
                q = (q * cos) + (_rotate_half(q) * sin)
                k = (k * cos) + (_rotate_half(k) * sin)
            keys, values = layer_cache.update(k, v)
            out = one_query_attention(layer_cache, q, keys, values, own_mask, self.scaling)
            hidden = residual + attention.o_proj(out.reshape(rows, 1, -1).contiguous())
            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            if gate_up is not None:
                gate, up = gate_up.linear(x).split(gate_up.sizes, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            hidden = residual + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.head(self.norm(hidden))[:, -1]


def serves(cache) -> bool:
    return all(type(layer) is SharedPrefixLayer for layer in cache.layers)
