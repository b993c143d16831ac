"""A lead for the CPU engine: one decoding step of the whole model compiled by torch.compile (inductor),
against the engine's eager lean step and the same function eager, in one run.

    .venv/bin/python benchmarks/cpu_compiled_step.py            # about 2 minutes on 2 cores (~40 s compiling)

The step is written as one function over static shapes (8 rows, a shared prompt padded to 512
positions, room for 64 positions of each row's own), with each layer's KV buffers a separate input
(with every layer's KV in one tensor, inductor copies the whole tensor at every write), frozen
weights (inductor packs them for oneDNN itself), attention as the engine's shared-prefix cascade.
It is not wired into the engine: the rows that end, the prompt and the chain change those shapes, and
each new shape costs another compile. Prints ms per step and the ratios; the compiled logits are
checked against the same function run eagerly.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

import thinktime  # noqa: F401  (before torch: it sets the OpenMP wait policy)
from thinktime.engines.decode_ops import rms_norm

ROWS, PROMPT_ROOM, OWN_ROOM = 8, 512, 64


class WholeStep(nn.Module):
    """One token per row through every layer: rotary, cascade attention over a shared prompt and each row's
    own positions (fp32, as engines/shared_prefix.py), SiLU MLP; logits [rows, vocab]."""

    def __init__(self, model):
        super().__init__()
        config, layers = model.config, model.model.layers
        self.eps, self.intermediate = config.rms_norm_eps, config.intermediate_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = config.hidden_size // self.heads
        self.embed, self.norm, self.head = model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight
        stack = lambda *ws: nn.Parameter(torch.cat(ws), requires_grad=False)  # noqa: E731
        self.qkv = nn.ParameterList(stack(l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight)
                                    for l in layers)
        self.gate_up = nn.ParameterList(stack(l.mlp.gate_proj.weight, l.mlp.up_proj.weight) for l in layers)
        self.o = nn.ParameterList(l.self_attn.o_proj.weight for l in layers)
        self.down = nn.ParameterList(l.mlp.down_proj.weight for l in layers)
        self.norm1 = nn.ParameterList(l.input_layernorm.weight for l in layers)
        self.norm2 = nn.ParameterList(l.post_attention_layernorm.weight for l in layers)

    def rms(self, x, weight):
        return rms_norm(x, weight, self.eps)  # LlamaRMSNorm's ops

    def forward(self, tokens, cos, sin, shared_keys, shared_values, shared_mask, own_keys, own_values, own_mask, at):
        rows, dim, heads, kv_heads = tokens.shape[0], self.dim, self.heads, self.kv_heads
        per_group, half = heads // kv_heads, dim // 2
        hidden = self.embed[tokens]
        cos, sin = cos[:, None, :], sin[:, None, :]
        for i in range(len(self.qkv)):
            out = F.linear(self.rms(hidden, self.norm1[i]), self.qkv[i])
            qk = out[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            q = qk[:, :heads].float().view(rows, kv_heads, per_group, dim)
            v = out[:, (heads + kv_heads) * dim:].view(rows, kv_heads, dim).float()
            own_keys[i].index_copy_(2, at.view(1), qk[:, heads:].float()[:, :, None, :])
            own_values[i].index_copy_(2, at.view(1), v[:, :, None, :])
            by_group = q.transpose(0, 1).reshape(kv_heads, rows * per_group, dim)
            shared = torch.bmm(by_group, shared_keys[i]).view(kv_heads, rows, per_group, -1).transpose(0, 1)
            own = torch.matmul(q, own_keys[i].transpose(-1, -2)) + own_mask[:, None, None, :]
            probs = torch.softmax(torch.cat([shared + shared_mask, own], -1) * dim ** -0.5, -1)
            room = shared_keys.shape[-1]
            attended = torch.bmm(probs[..., :room].transpose(0, 1).reshape(kv_heads, rows * per_group, room),
                                 shared_values[i]).view(kv_heads, rows, per_group, dim).transpose(0, 1)
            attended = attended + torch.matmul(probs[..., room:], own_values[i])
            hidden = hidden + F.linear(attended.reshape(rows, heads * dim).to(hidden.dtype), self.o[i])
            gate, up = F.linear(self.rms(hidden, self.norm2[i]), self.gate_up[i]).split(self.intermediate, -1)
            hidden = hidden + F.linear(F.silu(gate) * up, self.down[i])
        return F.linear(self.rms(hidden, self.norm), self.head).float()


def median_ms(step, args, count: int) -> float:
    for _ in range(3):
        step(*args)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        step(*args)
        times.append(time.perf_counter() - started)
    return sorted(times)[count // 2] * 1000


def thinking_prompt_cache(engine):
    """The engine's shared-prefix cache of the thinking prompt and a question, for 8 rows."""
    from thinktime.prompts import thinking_prompt
    from thinktime.types import Prompt

    text = engine.render(Prompt.of([{"role": "system", "content": thinking_prompt("en")},
                                    {"role": "user", "content": "What is 12 + 45?"}]))
    enc = engine.tokenizer([text], return_tensors="pt", add_special_tokens=False)
    return engine._shared_prefix_inputs(enc, ROWS, keep=False)[0]


def lean_step_ms(engine, count: int) -> float:
    """The engine's own step over a real shared-prefix cache, 32 own positions on."""
    cache = thinking_prompt_cache(engine)
    start = cache.layers[0].prefix_length
    tokens = torch.full((ROWS, 1), 1000)
    for position in range(start, start + 32):
        engine.lean_step(tokens, torch.full((ROWS, 1), position), cache, None)
    times = []
    for position in range(start + 32, start + 32 + count):
        started = time.perf_counter()
        engine.lean_step(tokens, torch.full((ROWS, 1), position), cache, None)
        times.append(time.perf_counter() - started)
    return sorted(times)[count // 2] * 1000


def whole_step_inputs(engine, own_length: int):
    """The whole step's inputs from the same prompt's cache (its keys and values padded to PROMPT_ROOM), each
    row's own positions copies of the prompt's last ones, the rotary tables of the next position."""
    cache = thinking_prompt_cache(engine)
    layers = cache.layers
    prompt_length = layers[0].prefix_length
    pad = PROMPT_ROOM - prompt_length
    shared_keys = torch.stack([F.pad(layer.keys_by_head, (0, pad)) for layer in layers])
    shared_values = torch.stack([F.pad(layer.values_by_head, (0, 0, 0, pad)) for layer in layers])
    shared_mask = torch.zeros(PROMPT_ROOM)
    shared_mask[prompt_length:] = float("-inf")
    own = [(F.pad(layer.prefix_keys[..., -own_length:, :].float(), (0, 0, 0, OWN_ROOM - own_length)).expand(ROWS, -1, -1, -1).contiguous(),
            F.pad(layer.prefix_values[..., -own_length:, :].float(), (0, 0, 0, OWN_ROOM - own_length)).expand(ROWS, -1, -1, -1).contiguous())
           for layer in layers]
    own_mask = torch.full((ROWS, OWN_ROOM), float("-inf"))
    own_mask[:, :own_length] = 0
    positions = torch.full((ROWS, 1), prompt_length + own_length - 1)
    hidden = torch.zeros(ROWS, 1, 1, dtype=engine.model.dtype)
    cos, sin = (table[:, 0] for table in engine.model.model.rotary_emb(hidden, positions))
    tokens = torch.randint(100, 20000, (ROWS,), generator=torch.Generator().manual_seed(0))
    return (tokens, cos, sin, shared_keys, shared_values, shared_mask, [k for k, _ in own], [v for _, v in own],
            own_mask, torch.tensor(own_length - 1)), prompt_length


def mark_rooms_dynamic(inputs) -> None:
    """The prompt's and each row's own room as dynamic dimensions, so that other lengths reuse the graph."""
    _, _, _, shared_keys, shared_values, shared_mask, own_keys, own_values, own_mask, _ = inputs
    for tensor, dim in ((shared_keys, -1), (shared_values, -2), (shared_mask, 0), (own_mask, 1),
                        *((t, 2) for t in own_keys + own_values)):
        torch._dynamo.mark_dynamic(tensor, dim % tensor.dim())


def grown(inputs, prompt_room: int, own_room: int):
    """The same inputs with more room for the prompt and each row's own positions (masked)."""
    tokens, cos, sin, shared_keys, shared_values, shared_mask, own_keys, own_values, own_mask, at = inputs
    more, own_more = prompt_room - shared_keys.shape[-1], own_room - own_mask.shape[1]
    other = (tokens, cos, sin, F.pad(shared_keys, (0, more)), F.pad(shared_values, (0, 0, 0, more)),
             F.pad(shared_mask, (0, more), value=float("-inf")),
             [F.pad(t, (0, 0, 0, own_more)) for t in own_keys], [F.pad(t, (0, 0, 0, own_more)) for t in own_values],
             F.pad(own_mask, (0, own_more), value=float("-inf")), at)
    mark_rooms_dynamic(other)
    return other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dynamic", action="store_true",
                        help="compile for any prompt and own-position room (dynamic shapes), then time a second size")
    args = parser.parse_args()
    import torch._inductor.config as inductor
    from transformers import AutoModelForCausalLM

    from thinktime import models
    from thinktime.engines.hf import TransformersEngine

    engine = TransformersEngine("smollm2-135m", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m").path, dtype=torch.bfloat16).eval()
    own_length = 33
    step = WholeStep(model).eval()
    with torch.inference_mode():
        inputs, prompt_length = whole_step_inputs(engine, own_length)
        lean = lean_step_ms(engine, args.steps)
        eager = median_ms(step, inputs, args.steps)
        want = step(*inputs)
        inductor.freezing = True
        started = time.perf_counter()
        if args.dynamic:
            mark_rooms_dynamic(inputs)
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        got = compiled(*inputs)
        compile_s = time.perf_counter() - started
        fast = median_ms(compiled, inputs, args.steps)
        if args.dynamic:  # another prompt and chain length: served by the same graph, or compiled again
            other = grown(inputs, prompt_room=PROMPT_ROOM + 128, own_room=OWN_ROOM + 64)
            started = time.perf_counter()
            compiled(*other)
            print(f"another size (prompt room {PROMPT_ROOM + 128}, own room {OWN_ROOM + 64}): first call "
                  f"{time.perf_counter() - started:.1f} s, then {median_ms(compiled, other, args.steps):.2f} ms a step")
    difference = (got - want).abs().max().item() / want.abs().max().item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"# {torch.__version__}, {torch.get_num_threads()} threads; 8 rows, ~{prompt_length} shared + {own_length} own positions")
    print(f"lean step (engine, eager): {lean:.2f} ms")
    print(f"whole step, eager:         {eager:.2f} ms")
    print(f"whole step, compiled:      {fast:.2f} ms after {compile_s:.1f} s of compiling "
          f"(logits within {difference:.1e} of eager's, relative; the same greedy token in {agree:.0%} of rows)")
    print(f"ratios: lean / compiled {lean / fast:.2f}x, eager / compiled {eager / fast:.2f}x")


if __name__ == "__main__":
    main()
