"""Fast decoding for Llama-family models loaded by transformers (Llama, InternLM3, Qwen2/3, Mistral).

`model.generate` spends most of a decoding step in Python and in tiny kernel launches: at batch 1
an 8B model on an H100 runs at 86 ms per step where reading the weights once takes 5.9 ms. This
module decodes the same model in the way of gpt-fast, in a few hundred readable lines:

- the prompt is prefilled once by the model's own forward (so the first token is the one
  `generate` picks), with logits for the last position only, and its KV cache is copied into the
  rows of all n samples (a fork: n samples of one prompt cost one prefill, not n);
- the KV cache is static, allocated once per decoder and grown only when a call needs more;
  rows may have prompts of different lengths (each row has its own position, no padding);
- one decoding step is a fixed sequence of kernels over static buffers (token, position, the
  uniforms of a seeded generator), so on CUDA it is captured as a CUDA graph per batch size and
  attention window, then replayed with no Python in between; sampling (greedy argmax, or
  temperature and top-p by the inverse CDF of a seeded uniform) happens inside the graph;
- on CUDA the per-layer pieces are compiled with torch.compile (one layer's code, reused by every
  layer and every graph: seconds of compiling, not minutes), and q/k/v and gate/up projections
  are fused into one matrix each; the model's own parameters become views into the fused
  matrices, so no memory is duplicated and `generate` keeps working on the same weights;
- tokens reach the CPU one step late through pinned memory, so the GPU never waits for Python
  (stop ids, stop strings, streaming and cancel are checked there).

On the CPU the same code runs eagerly (no graphs, no compile), which is how CI checks that the
tokens equal `generate`'s. The module needs only torch and transformers (the GPU benchmark loads
it on a machine without thinktime's other dependencies).
"""
from __future__ import annotations

import math
import os
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Model types whose decoder layers are Llama's (RMSNorm, rotary q/k, GQA attention, SiLU-gated MLP).
SUPPORTED_TYPES = ("llama", "internlm3", "qwen2", "qwen3", "mistral")
# RoPE variants whose tables depend only on the position (dynamic/longrope: within the original length).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_LENGTH_ROPE = ("dynamic", "longrope")
BLOCK = 256  # attention windows and cache lengths grow in steps of this many positions
# Generation-config settings that `generate` would apply and this decoder does not.
_UNSUPPORTED_GEN = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
                    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
                    "min_new_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                    "min_p": None, "renormalize_logits": False}


class FastPathUnavailable(RuntimeError):
    """The fast path cannot serve this call; `permanent` means it never will on this model/device."""

    def __init__(self, reason: str, permanent: bool = False):
        super().__init__(reason)
        self.permanent = permanent


def _base(model):
    return getattr(model, getattr(model, "base_model_prefix", "model"), None)


def unsupported_reason(model) -> str | None:
    """Why this decoder cannot run `model` (None when it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (only silu)"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "sliding-window attention layers"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", kind == "mistral"):
        return "sliding-window attention"
    base = _base(model)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "embed_tokens") or not hasattr(model, "lm_head"):
        return "not a decoder with model.layers, embed_tokens and lm_head"
    rope = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
    if rope is None:
        return "no rotary embedding module"
    if rope not in _STATIC_ROPE + _LENGTH_ROPE:
        return f"rope type {rope!r}"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without q/k/v/o and gate/up/down projections"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return f"parameters on {len(devices)} devices (offloaded or split models are not supported)"
    if any(getattr(cfg, name, None) for name in ("final_logit_softcapping", "attn_logit_softcapping")):
        return "logit soft-capping"
    return None


def generation_config_blocker(generation_config) -> str | None:
    """A generation-config setting that `generate` would honour and this decoder would not."""
    if generation_config is None:
        return None
    for name, neutral in _UNSUPPORTED_GEN.items():
        value = getattr(generation_config, name, neutral)
        if value not in (neutral, None) and not (isinstance(value, (list, tuple, dict)) and not value):
            return f"generation_config.{name}={value!r}"
    return None


# --- the math of one layer (pure functions of tensors: compiled once, reused by every layer) ----------

def rms_norm(x, weight, eps: float):
    # LlamaRMSNorm, op for op, so the numbers match transformers'.
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _pre_attention(h, d, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin, eps: float, n_heads: int, n_kv: int):
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
    q = _rotate(q, cos, sin).reshape(b, n_kv, n_heads // n_kv, head_dim)
    k = _rotate(k, cos, sin)
    return q, torch.stack((k, v), dim=1), h


def _masked_softmax(scores, valid, scaling: float):
    scores = (scores * scaling).masked_fill(~valid, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def _attend(q, keys, values, valid, softmax):
    """One query per row against its cached keys; the heads of a KV group share one matrix product.
    The products stay eager: the cache slices are strided views that cuBLAS reads in place."""
    scores = torch.matmul(q, keys.transpose(-1, -2))  # [B, kv, group, window]
    out = torch.matmul(softmax(scores, valid), values)  # [B, kv, group, head_dim]
    return out.reshape(out.shape[0], -1)


def _post_attention(h, attn, o_w, o_b, ln_w, gu_w, gu_b, down_w, down_b, eps: float):
    """The attention output into the residual, then the gated MLP; its output is added by the next layer."""
    h = h + F.linear(attn, o_w, o_b)
    x = rms_norm(h, ln_w, eps)
    gate, up = F.linear(x, gu_w, gu_b).chunk(2, dim=-1)
    return h, F.linear(F.silu(gate) * up, down_w, down_b)


def _head(h, d, norm_w, lm_w, lm_b, eps: float):
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


@dataclass
class _Weights:
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


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _fuse(linears, attr: str):
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


def _layer_fns(eps: float, n_heads: int, n_kv: int, scaling: float) -> dict:
    """The per-layer pieces with the model's constants bound in a closure: compiled code then takes
    tensors only (a Python float argument could become a graph input copied from the host each call)."""

    def pre(h, d, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin):
        return _pre_attention(h, d, ln_w, qkv_w, qkv_b, qn_w, kn_w, cos, sin, eps, n_heads, n_kv)

    def softmax(scores, valid):
        return _masked_softmax(scores, valid, scaling)

    def post(h, attn, o_w, o_b, ln_w, gu_w, gu_b, down_w, down_b):
        return _post_attention(h, attn, o_w, o_b, ln_w, gu_w, gu_b, down_w, down_b, eps)

    def head(h, d, norm_w, lm_w, lm_b):
        return _head(h, d, norm_w, lm_w, lm_b, eps)

    return {"pre": pre, "softmax": softmax, "post": post, "head": head}


def _bucket(rows: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, rows))))


def _round_up(n: int, block: int = BLOCK) -> int:
    return (n + block - 1) // block * block


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if value == "" else value not in ("0", "false", "no", "off")


class FastDecoder:
    """Static-cache, graph-captured decoding of one Llama-family transformers model.

    `compile` (torch.compile the per-layer pieces) and `graphs` (CUDA graphs) default to on for CUDA
    and off elsewhere; THINKTIME_FAST_COMPILE=0 / THINKTIME_FAST_GRAPHS=0 turn them off.
    `attention` (or THINKTIME_FAST_ATTENTION) is "bmm" (default) or "sdpa".
    """

    def __init__(self, model, *, compile: bool | None = None, graphs: bool | None = None, attention: str | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise FastPathUnavailable(reason, permanent=True)
        self.model = model
        cfg = model.config
        base = _base(model)
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.use_graphs = self.cuda and (graphs if graphs is not None else env_flag("THINKTIME_FAST_GRAPHS", True))
        # compile=True also compiles on the CPU (slow to start; tests use it to check the compiled code traces).
        self.use_compile = compile if compile is not None else (self.cuda and env_flag("THINKTIME_FAST_COMPILE", True))
        # "bmm": two cuBLAS products and a fused softmax (transformers' eager numerics; parallel at any
        # length); "sdpa": one scaled_dot_product_attention call (closer to transformers' sdpa numerics).
        self.attention = attention or os.environ.get("THINKTIME_FAST_ATTENTION", "bmm")
        if self.attention not in ("bmm", "sdpa"):
            raise ValueError(f"attention must be bmm or sdpa, not {self.attention!r}")
        attn0 = base.layers[0].self_attn
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.scaling = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.hidden = int(cfg.hidden_size)
        self.n_layers = len(base.layers)
        self.embed = base.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.rotary = base.rotary_emb
        self.rope_type = self.rotary.rope_type
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
        if self.rope_type in _LENGTH_ROPE:  # equal to the default RoPE only within the original length
            self.max_positions = min(self.max_positions, int(getattr(self.rotary, "original_max_seq_len",
                                                                     self.max_positions)))
        self.norm_w, self.norm_eps = base.norm.weight, _eps(base.norm)
        self.lm_w, self.lm_b = model.lm_head.weight, getattr(model.lm_head, "bias", None)
        with torch.no_grad():
            self.layers = [self._weights(layer) for layer in base.layers]
        norms = {self.norm_eps} | {w.eps1 for w in self.layers} | {w.eps2 for w in self.layers} | \
            {_eps(getattr(layer.self_attn, "q_norm")) for layer in base.layers if hasattr(layer.self_attn, "q_norm")}
        if len(norms) != 1:
            raise FastPathUnavailable(f"RMS norms with different epsilons {sorted(norms)}", permanent=True)
        self._eager = _layer_fns(self.norm_eps, self.n_heads, self.n_kv, self.scaling)
        self._fns = dict(self._eager)
        self.compile_error: str | None = None
        if self.use_compile:
            self._compile()
        self.kv: torch.Tensor | None = None
        self.rows_cap = 0
        self.len_cap = 0
        self.graphs: dict[tuple[int, int, str], torch.cuda.CUDAGraph] = {}
        self.graph_error: str | None = None
        self.failed_modes: dict[str, str] = {}  # sampling modes whose step would not capture: generate serves them
        self._pool = None
        self.stats = {"prefill_s": 0.0, "capture_s": 0.0, "captures": 0, "steps": 0, "warmup_s": 0.0}

    # --- set-up ---------------------------------------------------------------------------------

    def _weights(self, layer) -> _Weights:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gu = [mlp.gate_proj, mlp.up_proj]
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        return _Weights(
            ln1=layer.input_layernorm.weight, eps1=_eps(layer.input_layernorm),
            qkv_w=_fuse(qkv, "weight"), qkv_b=_fuse(qkv, "bias"),
            qn=q_norm.weight if q_norm is not None else None, kn=k_norm.weight if k_norm is not None else None,
            o_w=attn.o_proj.weight, o_b=attn.o_proj.bias,
            ln2=layer.post_attention_layernorm.weight, eps2=_eps(layer.post_attention_layernorm),
            gu_w=_fuse(gu, "weight"), gu_b=_fuse(gu, "bias"),
            down_w=mlp.down_proj.weight, down_b=mlp.down_proj.bias,
        )

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

    def _ensure_cache(self, rows: int, length: int) -> None:
        rows, length = max(rows, self.rows_cap), max(length, self.len_cap)
        if self.kv is not None and rows == self.rows_cap and length == self.len_cap:
            return
        self.graphs.clear()
        self.kv = None
        shape = (self.n_layers, 2, rows, self.n_kv, length, self.head_dim)
        need = math.prod(shape) * self.embed.element_size() + rows * length * 4
        if self.cuda:
            free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) \
                - torch.cuda.memory_allocated(self.device)  # the driver's free memory and the allocator's
            if need > free * 0.9:
                self.rows_cap = self.len_cap = 0
                raise FastPathUnavailable(f"a static KV cache of {rows} rows x {length} positions needs "
                                          f"{need / 1e9:.1f} GB and {free / 1e9:.1f} GB are free")
        dev = self.device
        self.kv = torch.zeros(shape, dtype=self.dtype, device=dev)  # zeros: masked slots must be finite
        self.tok = torch.zeros(rows, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.row_index = torch.arange(rows, device=dev)
        self.positions = torch.arange(length, device=dev)
        self.u = torch.ones(rows, length, dtype=torch.float32, device=dev)
        self.zeros = torch.zeros(rows, self.hidden, dtype=self.dtype, device=dev)
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.top_p = torch.ones((), dtype=torch.float32, device=dev)
        x = torch.zeros(1, dtype=self.dtype, device=dev)
        cos, sin = self.rotary(x, self.positions[None])  # the model's own RoPE table, exactly
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.host = torch.zeros(2, rows, dtype=torch.long, pin_memory=self.cuda)
        if self.cuda:
            self.events = [torch.cuda.Event(), torch.cuda.Event()]
            self._pool = torch.cuda.graph_pool_handle()
        self.rows_cap, self.len_cap = rows, length

    # --- one decoding step ------------------------------------------------------------------------

    def _step(self, rows: int, window: int, mode: str) -> None:
        """Reads tok/pos of the first `rows` rows, writes their KV, leaves the next tokens in tok and pos+1.
        Only tensor ops on static buffers: this is what a CUDA graph captures."""
        fns = self._fns
        tok, pos, index = self.tok[:rows], self.pos[:rows], self.row_index[:rows]
        h = F.embedding(tok, self.embed)
        d = self.zeros[:rows]
        cos, sin = self.cos[pos], self.sin[pos]
        valid = (self.positions[:window][None, :] <= pos[:, None])[:, None, None, :]
        for i, w in enumerate(self.layers):
            q, new, h = fns["pre"](h, d, w.ln1, w.qkv_w, w.qkv_b, w.qn, w.kn, cos, sin)
            self.kv[i][:, index, :, pos] = new  # [B, 2, kv, head_dim] into each row's own position
            keys, values = self.kv[i, 0], self.kv[i, 1]
            if self.attention == "sdpa":
                a = F.scaled_dot_product_attention(q, keys[:rows, :, :window], values[:rows, :, :window],
                                                   attn_mask=valid, scale=self.scaling).reshape(rows, -1)
            else:
                a = _attend(q, keys[:rows, :, :window], values[:rows, :, :window], valid, fns["softmax"])
            h, d = fns["post"](h, a, w.o_w, w.o_b, w.ln2, w.gu_w, w.gu_b, w.down_w, w.down_b)
        logits = fns["head"](h, d, self.norm_w, self.lm_w, self.lm_b)
        nxt = sample(logits, self.u[index, pos], mode, self.temperature, self.top_p)
        self.tok[:rows].copy_(nxt)
        self.pos[:rows].add_(1)

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
                fns, error = self._fns, self.compile_error
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

    # --- a call ------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop_ids=(), pad_id: int = 0, stop_strings=(), tokenizer=None, streamer=None,
                 cancel: threading.Event | None = None, prefix_cache=None) -> list[list[int]]:
        """New tokens for each prompt repeated n times (rows in prompt-major order), as `generate` returns
        them: each row runs to a stop id (kept) or a stop string (the token that completes it kept), then
        pad_id fills it to the common length. `streamer` gets the prompt, then each step's tokens.

        Raises FastPathUnavailable before anything is streamed when this call cannot run here.
        """
        with torch.inference_mode():
            return self._generate(prompts, n, max_new_tokens, greedy, temperature, top_p, seed, set(stop_ids),
                                  pad_id, tuple(stop_strings), tokenizer, streamer, cancel or threading.Event(),
                                  prefix_cache)

    def _generate(self, prompts, n, max_new, greedy, temperature, top_p, seed, stop_ids, pad_id, stop_strings,
                  tokenizer, streamer, cancel, prefix_cache):
        rows = len(prompts) * n
        if rows == 0 or max_new <= 0:
            return [[] for _ in range(rows)]
        lengths = [len(p) for p in prompts for _ in range(n)]
        if min(lengths) < 1:
            raise FastPathUnavailable("an empty prompt")
        need = max(lengths) + max_new
        if need > self.max_positions:
            raise FastPathUnavailable(f"{need} positions exceed the model's {self.max_positions}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer")
        width = _bucket(rows)
        mode = "greedy" if greedy else ("top_p" if top_p < 1.0 else "sample")
        if self.use_graphs and mode in self.failed_modes:  # before growing a cache this call would not use
            raise FastPathUnavailable(f"the {mode} step did not capture as a CUDA graph ({self.failed_modes[mode]})")
        self._ensure_cache(width, min(_round_up(need), self.max_positions))
        if not greedy:
            self.temperature.fill_(float(temperature))
            self.top_p.fill_(float(top_p))
        # A row's k-th new token reads the uniform at its position length - 1 + k: the draws of the decoding
        # loop (draw_uniforms), so a seeded sample depends neither on max_new_tokens nor on the other rows'
        # prompt lengths, and is the loop's sample.
        draws = draw_uniforms(seed, rows, max_new).to(self.device)
        at = torch.tensor(lengths, device=self.device)[:, None] - 1 + torch.arange(max_new, device=self.device)
        self.u[:rows].scatter_(1, at, draws)
        started = time.perf_counter()
        first = self._prefill(prompts, n, rows, width, lengths, mode, prefix_cache)
        self.stats["prefill_s"] = time.perf_counter() - started
        window = lambda step: min(_round_up(max(lengths) + step), self.len_cap)  # noqa: E731
        try:
            step_fn = self._runner(width, window(1), mode) if max_new > 1 else None
        except Exception as exc:  # capture failed before anything was streamed: the caller falls back
            self._capture_failed(mode, exc)
            raise FastPathUnavailable(f"CUDA graph capture failed ({self.graph_error})") from exc
        state = Rows(rows, stop_ids, pad_id, stop_strings, tokenizer, streamer)
        if streamer is not None:
            streamer.put(torch.tensor([prompts[0]]))  # as generate does, the prompt comes first
        state.push(first.tolist())
        current = window(1)
        pending = None
        step = 1
        while step < max_new and not state.all_done and not cancel.is_set():
            if window(step) != current:
                current = window(step)
                try:
                    step_fn = self._runner(width, current, mode)
                except Exception as exc:  # mid-call: finish this call without graphs, say so
                    self._capture_failed(mode, exc)
                    warnings.warn(f"thinktime fast decoding: CUDA graph capture failed ({self.graph_error}); "
                                  f"finishing this call without graphs", RuntimeWarning, stacklevel=3)
                    step_fn = self._runner(width, current, mode)
            step_fn()
            self.stats["steps"] += 1
            # Tokens come back one step late, so the GPU runs the next step while Python reads this one.
            slot = step % 2
            self.host[slot, :rows].copy_(self.tok[:rows], non_blocking=self.cuda)
            if self.cuda:
                self.events[slot].record()
            if pending is not None:
                self._read(state, pending, rows)
            pending = slot
            step += 1
        if pending is not None and not state.all_done:
            self._read(state, pending, rows)
        if streamer is not None:
            streamer.end()
        return state.padded()

    def _read(self, state: "Rows", slot: int, rows: int) -> None:
        if self.cuda:
            self.events[slot].synchronize()
        state.push(self.host[slot, :rows].tolist())

    def _capture_failed(self, mode: str, exc: BaseException) -> None:
        self.graph_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.failed_modes[mode] = self.graph_error
        self.graphs = {k: g for k, g in self.graphs.items() if k[2] != mode}
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _prefill(self, prompts, n, rows, width, lengths, mode, prefix_cache) -> torch.Tensor:
        """Fills each prompt's KV into its n rows and returns the first new token of every row."""
        dev = self.device
        reuse = prefix_cache is not None and getattr(prefix_cache, "enabled", False) and min(map(len, prompts)) >= 2
        first = torch.zeros(rows, dtype=torch.long, device=dev)
        for p, ids in enumerate(prompts):
            lo, hi = p * n, (p + 1) * n
            if reuse:  # all but the last token from the prefix cache; the last token goes through a step
                cache = prefix_cache.prefill(list(ids[:-1]))
                if cache is None:
                    cache = self._forward(ids[:-1])[1]
                self._copy_kv(cache, lo, hi, len(ids) - 1)
            else:
                logits, cache = self._forward(ids)
                self._copy_kv(cache, lo, hi, len(ids))
                index = self.row_index[lo:hi]
                u = self.u[index, torch.full((hi - lo,), len(ids) - 1, device=dev)]
                first[lo:hi] = sample(logits.expand(hi - lo, -1), u, mode, self.temperature, self.top_p)
        self.tok[rows:width].zero_()
        self.pos[rows:width].zero_()
        if reuse:
            self.tok[:rows] = torch.tensor([ids[-1] for ids in prompts for _ in range(n)], device=dev)
            self.pos[:rows] = torch.tensor([x - 1 for x in lengths], device=dev)
            self._run_step(width, min(_round_up(max(lengths)), self.len_cap), mode)
            return self.tok[:rows].clone()
        self.tok[:rows] = first
        self.pos[:rows] = torch.tensor(lengths, device=dev)
        return first

    def _forward(self, ids):
        """The model's own forward over a prompt: last-position logits and a dynamic cache."""
        out = self.model(input_ids=torch.tensor([list(ids)], device=self.device), use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out.logits[:, -1].float(), cache

    def _copy_kv(self, cache, lo: int, hi: int, length: int) -> None:
        for i in range(self.n_layers):
            if hasattr(cache, "layers"):
                keys, values = cache.layers[i].keys, cache.layers[i].values
            else:  # older transformers
                keys, values = cache.key_cache[i], cache.value_cache[i]
            if keys.shape[-2] != length:
                raise FastPathUnavailable(f"the prefill cache holds {keys.shape[-2]} positions, expected {length}")
            self.kv[i, 0, lo:hi, :, :length] = keys
            self.kv[i, 1, lo:hi, :, :length] = values

    def warmup(self, rows: int = 1, length: int = 1024, modes=("greedy",)) -> float:
        """Allocates the cache and captures (and compiles) the steps for `rows` rows up front; seconds taken."""
        started = time.perf_counter()
        with torch.inference_mode():
            width = _bucket(rows)
            self._ensure_cache(width, min(_round_up(length), self.max_positions))
            self.tok[:width].zero_()
            self.pos[:width].zero_()
            for mode in modes:
                for window in range(BLOCK, self.len_cap + 1, BLOCK):
                    self._runner(width, window, mode)
                    if not self.use_graphs:
                        self._run_step(width, window, mode)
                        break
            if self.cuda:
                torch.cuda.synchronize(self.device)
        took = time.perf_counter() - started
        self.stats["warmup_s"] += took
        return took


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


def stop_window(stop_strings) -> int:
    """How many of a row's last tokens can hold a stop string: one of b UTF-8 bytes lies within the last b
    tokens (a Chinese character or an emoji can take a token per byte), plus a few for a token that straddles
    its start."""
    return max((len(s.encode("utf-8")) for s in stop_strings), default=0) + 4


class Rows:
    """The CPU side of a call: each row's tokens, stop ids and stop strings, the streamer."""

    def __init__(self, rows, stop_ids, pad_id, stop_strings, tokenizer, streamer):
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.stop_ids, self.pad_id = stop_ids, pad_id
        self.stop_strings, self.tokenizer, self.streamer = stop_strings, tokenizer, streamer
        self.window = stop_window(stop_strings)
        self.all_done = False
        self.steps = 0

    def push(self, tokens: list[int]) -> None:
        self.steps += 1
        shown = []
        for row, token in enumerate(tokens):
            if self.done[row]:
                shown.append(self.pad_id)
                continue
            self.ids[row].append(token)
            shown.append(token)
            if token in self.stop_ids:
                self.done[row] = True
            elif self.stop_strings:
                tail = self.tokenizer.decode(self.ids[row][-self.window:], skip_special_tokens=True)
                if any(s in tail for s in self.stop_strings):
                    self.done[row] = True
        if self.streamer is not None:
            self.streamer.put(torch.tensor(shown))
        self.all_done = all(self.done)

    def padded(self) -> list[list[int]]:
        return [ids + [self.pad_id] * (self.steps - len(ids)) for ids in self.ids]


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def run_for_engine(engine, enc, params, max_new: int, cancel, streamer=None, reuse: bool = False):
    """TransformersEngine's fast path: new-token rows shaped like `generate`'s, or None to use `generate`
    (the reason is warned once; a permanent failure turns the fast path off for the engine). The engine's first
    fast-path call first checks the decoder against `generate` (engines/fast_check.py): a parting beyond a
    near-tie turns the fast path off for the engine, and that call goes to `generate` too."""
    from thinktime.engines import fast_check  # not at the top: the benchmark loads this file alone

    decoder = engine.fast
    blocker = generation_config_blocker(getattr(engine.model, "generation_config", None))
    if blocker:
        warn_once(f"thinktime fast decoding off for this model: {blocker} is set and only generate applies it")
        return None
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(enc.input_ids, enc.attention_mask)]
    try:
        if getattr(engine, "fast_check", None) is None and not fast_check.first_use(engine, decoder, prompts[0],
                                                                                      max_new):
            return None
        return decoder.generate(
            prompts, n=params.n, max_new_tokens=max_new, greedy=params.greedy, temperature=params.temperature,
            top_p=params.top_p, seed=list(params.seeds) if params.seeds else params.seed, stop_ids=engine.stop_ids,
            pad_id=engine.tokenizer.pad_token_id,
            stop_strings=params.stop, tokenizer=engine.tokenizer, streamer=streamer, cancel=cancel,
            prefix_cache=engine.prefix_cache if reuse else None)
    except FastPathUnavailable as exc:
        if exc.permanent:
            engine.fast = None
            warn_once(f"thinktime fast decoding turned off: {exc}; using generate")
        else:
            warn_once(f"thinktime fast decoding skipped for a call: {exc}; using generate")
        return None
