"""The tensor math of one decoding step of a Llama-family model, and its sampling.

Pure functions of tensors, shared by the GPU fast decoder (engines/fast.py, which compiles and captures
them) and the CPU decoding loop (engines/decode_loop.py). Needs only torch (the GPU benchmark loads the
fast decoder where thinktime's other dependencies are absent).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# --- the math of one layer (pure functions of tensors: compiled once, reused by every layer) ----------

def rms_norm(x, weight, eps: float):
    # LlamaRMSNorm, op for op, so the numbers match transformers'.
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def pre_attention(h, d, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin, eps: float, n_heads: int, n_kv: int):
    """h += d (the previous layer's MLP output); q and the new keys and values ([B, 2, kv, head_dim], for one
    cache write) of the normed h, with RoPE (and Qwen3's q/k norms)."""
    h = h + d
    x = rms_norm(h, ln_w, eps)
    qkv = F.linear(x, qkv_w, qkv_b)
    b, head_dim = h.shape[0], cos.shape[-1]
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(b, n_heads, head_dim)
    k = k.reshape(b, n_kv, head_dim)
    v = v.reshape(b, n_kv, head_dim)
    if qn_w is not None:
        q = rms_norm(q, qn_w, eps)
        k = rms_norm(k, kn_w, eps)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q = rotate(q, cos, sin).reshape(b, n_kv, n_heads // n_kv, head_dim)
    k = rotate(k, cos, sin)
    return q, torch.stack((k, v), dim=1), h


def masked_softmax(scores, valid, scaling: float):
    scores = (scores * scaling).masked_fill(~valid, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def attend(q, keys, values, valid, softmax):
    """One query per row against its cached keys; the heads of a KV group share one matrix product.
    The products stay eager: the cache slices are strided views that cuBLAS reads in place."""
    scores = torch.matmul(q, keys.transpose(-1, -2))  # [B, kv, group, window]
    out = torch.matmul(softmax(scores, valid), values)  # [B, kv, group, head_dim]
    return out.reshape(out.shape[0], -1)


def post_attention(h, attn, o_w, o_b, ln_w, gu_w, gu_b, down_w, down_b, eps: float):
    """The attention output into the residual, then the gated MLP; its output is added by the next layer."""
    h = h + F.linear(attn, o_w, o_b)
    x = rms_norm(h, ln_w, eps)
    gate, up = F.linear(x, gu_w, gu_b).chunk(2, dim=-1)
    return h, F.linear(F.silu(gate) * up, down_w, down_b)


def head_logits(h, d, norm_w, lm_w, lm_b, eps: float):
    return F.linear(rms_norm(h + d, norm_w, eps), lm_w, lm_b).float()


def sample(logits, u, mode: str, temperature, top_p, candidates: int | None = None):
    """Next tokens from fp32 logits [B, V]: argmax, or the inverse CDF at u in (0, 1] of the tempered
    (and top-p truncated, as transformers' TopPLogitsWarper does) distribution.

    `candidates` (top-p only): look for the kept tokens among that many most likely ones first (then 16
    times as many), instead of sorting the whole vocabulary, which took 15 ms for 8 rows of a 49k
    vocabulary on a CPU, more than half a decoding step; the whole sort only where the kept set might
    reach beyond them. Not for CUDA graphs (the fallback is a branch on the data)."""
    if mode == "greedy":
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if mode == "top_p" and candidates is not None:
        for count in (candidates, candidates * 16):  # a few, then many more, then the whole vocabulary
            if count >= scores.shape[-1]:
                break
            picked = _top_p_among_candidates(scores, u, top_p, count)
            if picked is not None:
                return picked
    if mode == "top_p":
        scores, order = torch.sort(scores, dim=-1)  # ascending, like transformers
        cumulative = scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[:, -1] = False  # keep at least one token
        scores = scores.masked_fill(remove, float("-inf"))
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=cdf.shape[-1] - 1)
    if mode == "top_p":
        pick = order.gather(-1, pick)
    return pick.squeeze(-1)


def _top_p_among_candidates(scores, u, top_p: float, candidates: int):
    """`sample`'s top-p over the `candidates` highest scores, or None if some row's kept set may not fit.

    TopPLogitsWarper removes a token when the probability mass at or below it, in ascending order, is at
    most 1 - top_p: that is, when the mass strictly above it is at least top_p. So the kept tokens are
    the most likely ones while the mass above them stays under top_p, and they are all among the
    candidates when the candidates' mass reaches top_p. The draw is the same inverse CDF over the
    kept tokens in ascending order as the full sort's."""
    top, index = scores.topk(candidates, dim=-1)  # descending
    probs = top.sub(scores.logsumexp(dim=-1, keepdim=True)).exp_()
    above = probs.cumsum(dim=-1)
    if bool((above[:, -1] < top_p).any()):
        return None
    keep = (above - probs) < top_p
    ascending = top.masked_fill(~keep, float("-inf")).flip(-1)
    cdf = ascending.softmax(dim=-1).cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=candidates - 1)
    return index.flip(-1).gather(-1, pick).squeeze(-1)


def layer_fns(eps: float, n_heads: int, n_kv: int, scaling: float) -> dict:
    """The per-layer pieces with the model's constants bound in a closure: compiled code then takes
    tensors only (a Python float argument could become a graph input copied from the host each call)."""

    def pre(h, d, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin):
        return pre_attention(h, d, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin, eps, n_heads, n_kv)

    def softmax(scores, valid):
        return masked_softmax(scores, valid, scaling)

    def post(h, attn, o_w, o_b, ln_w, gu_w, gu_b, down_w, down_b):
        return post_attention(h, attn, o_w, o_b, ln_w, gu_w, gu_b, down_w, down_b, eps)

    def head(h, d, norm_w, lm_w, lm_b):
        return head_logits(h, d, norm_w, lm_w, lm_b, eps)

    return {"pre": pre, "softmax": softmax, "post": post, "head": head}


def draw_uniforms(seed, rows: int, steps: int) -> torch.Tensor:
    """[rows, steps] uniforms in (0, 1] for sampling. Drawn step by step ([step, row]), so that a row's draws
    do not depend on `steps`: a seeded sample is a prefix of the same sample with more room (a budget or the
    context may cut max_new_tokens). `seed`: one for the call, or a list of one per prompt (the rows are
    the prompts' samples, n each, in order), which makes a prompt's draws those of its call alone."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed, as generate does
    seeds = [seed] if isinstance(seed, int) else list(seed)
    per_prompt = rows // len(seeds)
    return torch.cat([(1.0 - torch.rand(steps, per_prompt, generator=torch.Generator().manual_seed(int(s)))).T
                      for s in seeds])
