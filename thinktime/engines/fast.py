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
import sys
import threading
import time
import warnings

import torch
import torch.nn.functional as F

# rms_norm is not used here: benchmarks/cpu_compiled_step.py imports it from this module.
try:
    from thinktime.engines.decode_ops import attend, draw_uniforms, layer_fns, rms_norm, sample  # noqa: F401
    from thinktime.engines.decode_rows import Rows, env_flag
    from thinktime.engines.fast_graphs import CompiledSteps
    from thinktime.engines.fast_support import (LENGTH_ROPE, FastPathUnavailable, base_model, generation_config_blocker,
                                                unsupported_reason)
    from thinktime.engines.fast_weights import layer_weights, norm_eps
except ImportError:  # loaded by file path where thinktime's other dependencies are absent (benchmarks/gpu_decode.py)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_ops import attend, draw_uniforms, layer_fns, rms_norm, sample  # noqa: F401
    from decode_rows import Rows, env_flag
    from fast_graphs import CompiledSteps
    from fast_support import LENGTH_ROPE, FastPathUnavailable, base_model, generation_config_blocker, unsupported_reason
    from fast_weights import layer_weights, norm_eps

BLOCK = 256  # attention windows and cache lengths grow in steps of this many positions


def _bucket(rows: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, rows))))


def _round_up(n: int, block: int = BLOCK) -> int:
    return (n + block - 1) // block * block


class FastDecoder(CompiledSteps):
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
        base = base_model(model)
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
        if self.rope_type in LENGTH_ROPE:  # equal to the default RoPE only within the original length
            self.max_positions = min(self.max_positions, int(getattr(self.rotary, "original_max_seq_len",
                                                                     self.max_positions)))
        self.norm_w, self.norm_eps = base.norm.weight, norm_eps(base.norm)
        self.lm_w, self.lm_b = model.lm_head.weight, getattr(model.lm_head, "bias", None)
        with torch.no_grad():
            self.layers = [layer_weights(layer) for layer in base.layers]
        norms = {self.norm_eps} | {w.eps1 for w in self.layers} | {w.eps2 for w in self.layers} | \
            {norm_eps(getattr(layer.self_attn, "q_norm")) for layer in base.layers if hasattr(layer.self_attn, "q_norm")}
        if len(norms) != 1:
            raise FastPathUnavailable(f"RMS norms with different epsilons {sorted(norms)}", permanent=True)
        self._eager = layer_fns(self.norm_eps, self.n_heads, self.n_kv, self.scaling)
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
                a = attend(q, keys[:rows, :, :window], values[:rows, :, :window], valid, fns["softmax"])
            h, d = fns["post"](h, a, w.o_w, w.o_b, w.ln2, w.gu_w, w.gu_b, w.down_w, w.down_b)
        logits = fns["head"](h, d, self.norm_w, self.lm_w, self.lm_b)
        nxt = sample(logits, self.u[index, pos], mode, self.temperature, self.top_p)
        self.tok[:rows].copy_(nxt)
        self.pos[:rows].add_(1)

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
        mode = "greedy" if greedy else ("top_p" if top_p < 1.0 else "sample")
        need = self._check_call(lengths, max_new, mode, stop_strings, tokenizer)
        width = _bucket(rows)
        self._ensure_cache(width, min(_round_up(need), self.max_positions))
        self._set_sampling(rows, lengths, max_new, greedy, temperature, top_p, seed)
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
        self._decode_n_tokens(state, step_fn, window, rows, width, max_new, mode, cancel)
        if streamer is not None:
            streamer.end()
        return state.padded()

    def _check_call(self, lengths: list[int], max_new: int, mode: str, stop_strings, tokenizer) -> int:
        """The positions the call needs; FastPathUnavailable (or ValueError) for what cannot run here."""
        if min(lengths) < 1:
            raise FastPathUnavailable("an empty prompt")
        need = max(lengths) + max_new
        if need > self.max_positions:
            raise FastPathUnavailable(f"{need} positions exceed the model's {self.max_positions}")
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer")
        if self.use_graphs and mode in self.failed_modes:  # before growing a cache this call would not use
            raise FastPathUnavailable(f"the {mode} step did not capture as a CUDA graph ({self.failed_modes[mode]})")
        return need

    def _set_sampling(self, rows, lengths, max_new, greedy, temperature, top_p, seed) -> None:
        """Temperature, top-p and each row's uniforms into the static buffers the step reads."""
        if not greedy:
            self.temperature.fill_(float(temperature))
            self.top_p.fill_(float(top_p))
        # A row's k-th new token reads the uniform at its position length - 1 + k: the draws of the decoding
        # loop (draw_uniforms), so a seeded sample depends neither on max_new_tokens nor on the other rows'
        # prompt lengths, and is the loop's sample.
        draws = draw_uniforms(seed, rows, max_new).to(self.device)
        at = torch.tensor(lengths, device=self.device)[:, None] - 1 + torch.arange(max_new, device=self.device)
        self.u[:rows].scatter_(1, at, draws)

    def _decode_n_tokens(self, state: "Rows", step_fn, window, rows: int, width: int, max_new: int, mode: str,
                         cancel: threading.Event) -> None:
        """Steps until every row stopped, max_new tokens, or cancel; each step's tokens pushed into `state`.
        window(step): the attention window of a step (the longest row so far, rounded up to a graph size)."""
        current, pending, step = window(1), None, 1
        while step < max_new and not state.all_done and not cancel.is_set():
            if window(step) != current:
                current = window(step)
                try:
                    step_fn = self._runner(width, current, mode)
                except Exception as exc:  # mid-call: finish this call without graphs, say so
                    self._capture_failed(mode, exc)
                    warnings.warn(f"thinktime fast decoding: CUDA graph capture failed ({self.graph_error}); "
                                  f"finishing this call without graphs", RuntimeWarning, stacklevel=4)
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

    def _read(self, state: "Rows", slot: int, rows: int) -> None:
        if self.cuda:
            self.events[slot].synchronize()
        state.push(self.host[slot, :rows].tolist())

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
