"""Decoding speed of an 8B InternLM3-shaped model: plain `generate` against thinktime's fast decoder.

On a CUDA machine (the default) it builds the InternLM3-8B shape (InternLM3Config where transformers
has it, else LlamaConfig with the same shapes: 48 layers, hidden 4096, MLP 10240, 32 heads, 2 KV
heads, vocab 128512) with random bf16 weights, takes a 600-token prompt and 256 new tokens, and in
the same run measures:

- the copy bandwidth of the card (a large device-to-device copy; bytes read + written per second),
  which gives the batch-1 floor: the bytes a step reads (every weight but the embedding table, of
  which a step reads one row) / bandwidth per token;
- plain `model.generate` (as the seed and the engine's fallback call it): batch 1 greedy, and 16 and
  64 samples of the one prompt (rows repeated, T=0.7, top-p 0.95);
- thinktime's FastDecoder (thinktime/engines/fast.py, what TransformersEngine uses on CUDA) on the
  same model and prompt: batch 1 greedy, n=16 and n=64 sampled; the first call of each includes
  compiling and graph capture (reported as warm-up), the second is timed;
- whether greedy outputs match token for token (where they part, generate's own scores at that step
  tell a bf16 near-tie, a few rounding steps at the logits' scale, from a bug: the rule of
  thinktime/engines/fast_check.py, which the engine also applies on first use);
- the engine's first-use check itself (16 greedy tokens both ways, compared by that rule): its
  seconds, and their share of a batch-1 chain of 8,192 new tokens at the fast decoder's measured speed.

It prints one table (tok/s, ms per step, % of the bandwidth floor, warm-up) and, with --out, writes
it as Markdown and JSON after every row (a run cut short keeps what it measured). It finishes in
under 6 minutes on an H100/H200.

`--cpu` runs a tiny random model on the CPU instead (seconds), in fp32 and without CUDA graphs or
torch.compile: the decoder's step, prefill, sampling and bookkeeping code, checking greedy equality
with generate (mixed prompt lengths included), sample shapes and seeded reproducibility; CI runs it
(tests/test_engine_fast.py). Graph capture, compiled kernels and bf16 numerics run on a GPU only.

    PYTHONUNBUFFERED=1 timeout 420 python3 benchmarks/gpu_decode.py --out $OUT
    python benchmarks/gpu_decode.py --cpu
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
SOLVE_TOKENS = 8192  # new tokens of a default chain on a GPU (thinktime/api.py)


def load(name: str):
    """thinktime.engines.<name> (fast, fast_check); by file path where thinktime's other dependencies are not
    installed."""
    try:
        return importlib.import_module(f"thinktime.engines.{name}")
    except Exception:
        path = ROOT / "thinktime" / "engines" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"thinktime_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"thinktime_{name}"] = module
        spec.loader.exec_module(module)
        return module


def build_config(tiny: bool):
    shape = dict(vocab_size=128512, hidden_size=4096, intermediate_size=10240, num_hidden_layers=48,
                 num_attention_heads=32, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if tiny:
        shape.update(vocab_size=1024, hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    cls = getattr(transformers, "InternLM3Config", None)
    name = "InternLM3Config"
    if cls is None:
        cls, name = transformers.LlamaConfig, "LlamaConfig (this transformers has no InternLM3Config)"
    return cls(**shape), name


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy (the batch-1 decode ceiling)."""
    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    sync(device)
    seconds = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds


def run_generate(model, prompt, rows: int, new: int, greedy: bool, seed: int = 0, scores: list | None = None):
    """Generated rows and seconds; `scores` (a list) receives row 0's scores ([vocab]) at every step, generate's
    own (what its greedy choice saw, not a separate forward's numbers)."""
    ids = torch.tensor([prompt] * rows, device=model.device)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    if scores is not None:
        kwargs.update(output_scores=True, return_dict_in_generate=True)
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=0.7, top_p=0.95, top_k=None)
    torch.manual_seed(seed)
    sync(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(model.device)
    seconds = time.perf_counter() - started
    if scores is not None:
        scores.extend(step[0] for step in out.scores)
        out = out.sequences
    return out[:, len(prompt):].tolist(), seconds


def run_fast(decoder, prompt, n: int, new: int, greedy: bool, seed: int = 0):
    sync(decoder.device)
    started = time.perf_counter()
    rows = decoder.generate([prompt], n=n, max_new_tokens=new, greedy=greedy, temperature=0.7, top_p=0.95,
                            seed=seed, stop_ids=(), pad_id=0)
    sync(decoder.device)
    return rows, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="a tiny random model on the CPU: correctness only")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--samples", default="16,64", help="n for the sampled rows (comma-separated)")
    parser.add_argument("--no-compile", action="store_true", help="CUDA graphs over eager kernels only")
    parser.add_argument("--out", default=None, help="folder for gpu_decode.md and gpu_decode.json")
    parser.add_argument("--budget", type=float, default=300.0,
                        help="seconds after which the remaining configurations are skipped (to end within 6 min)")
    args = parser.parse_args()
    fast, fast_check = load("fast"), load("fast_check")

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --cpu for the correctness check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    prompt_len = args.prompt_tokens or (48 if args.cpu else 600)
    new = args.new_tokens or (24 if args.cpu else 256)
    samples = [int(x) for x in args.samples.split(",") if x] if not args.cpu else [4]
    began = time.perf_counter()
    torch.manual_seed(0)
    config, config_name = build_config(tiny=args.cpu)
    built = time.perf_counter()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    sync(device)
    build_s = time.perf_counter() - built
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    # A step reads every weight once, but of the embedding table one row per sequence (the LM head is apart
    # unless tied, and then it is read whole).
    step_bytes = weight_bytes - (0 if config.tie_word_embeddings else embedding.numel() * embedding.element_size())
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (prompt_len,), generator=generator).tolist()

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "config": config_name,
        "layers": config.num_hidden_layers, "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "weight_gb": round(weight_bytes / 1e9, 2), "dtype": str(dtype).replace("torch.", ""),
        "prompt_tokens": prompt_len, "new_tokens": new, "build_s": round(build_s, 1),
    }
    print(f"{info['device']} | torch {info['torch']} | transformers {info['transformers']} | {config_name} | "
          f"{info['weight_gb']} GB of {info['dtype']} weights | prompt {prompt_len} | new {new}", flush=True)

    floor_ms = None
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device)
        floor_ms = step_bytes / bandwidth * 1e3
        info["copy_bandwidth_tb_s"] = round(bandwidth / 1e12, 2)
        info["floor_ms_per_step"] = round(floor_ms, 2)
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written) -> batch-1 floor {floor_ms:.2f} ms/token "
              f"({1e3 / floor_ms:.0f} tok/s)", flush=True)

    rows_out = []

    def record(engine, label, rows, n_tokens, seconds, warmup=None):
        ms = seconds / new * 1e3
        row = {"engine": engine, "run": label, "rows": rows, "tok_s": round(n_tokens / seconds, 1),
               "ms_per_step": round(ms, 2), "floor_pct": round(floor_ms / ms * 100, 1) if floor_ms else None,
               "warmup_s": round(max(0.0, warmup), 1) if warmup is not None else None}
        rows_out.append(row)
        print(f"  {engine:10s} {label:14s} {row['tok_s']:9.1f} tok/s  {row['ms_per_step']:8.2f} ms/step"
              + (f"  {row['floor_pct']:5.1f}% of floor" if floor_ms else "")
              + (f"  warm-up {warmup:.1f} s" if warmup is not None else ""), flush=True)

    checks: dict = {}
    budget = args.budget
    by_run = lambda engine, label: next(r for r in rows_out if (r["engine"], r["run"]) == (engine, label))  # noqa: E731
    decoders: dict = {}  # per run label: the state of the decoder that ran it (compile, graphs, errors)

    def table() -> str:
        return _table(info, rows_out, checks, decoders, samples, floor_ms, config_name, prompt_len, new)

    def save():  # after every row, so a run cut short still leaves its figures
        info["checks"], info["decoders"], info["total_s"] = checks, decoders, round(time.perf_counter() - began, 1)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_decode.json").write_text(json.dumps({"info": info, "rows": rows_out}, indent=2) + "\n")
            (out / "gpu_decode.md").write_text(table() + "\n")

    def over_budget(label) -> bool:
        if time.perf_counter() - began > budget:
            print(f"  skipped {label}: past the {budget:.0f} s budget", flush=True)
            checks[f"{label}_skipped"] = True
            return True
        return False

    def fast_run(label, n, greedy, seed, extra_warmup=0.0):
        """Cold call (compiles, captures) then the timed warm call; None where the decoder failed."""
        try:
            cold, cold_s = run_fast(decoder, prompt, n, new, greedy, seed)
            warm, warm_s = run_fast(decoder, prompt, n, new, greedy, seed)
        except Exception as exc:  # report and carry on: one GPU run must tell as much as it can
            checks[f"{label}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  thinktime  {label}: FAILED {checks[f'{label}_error']}", flush=True)
            save()
            return None
        finally:  # read after the calls: compile is lazy, and a failure in the first call turns it off
            decoders[label] = {"compile": decoder.use_compile, "graphs": decoder.use_graphs,
                               "compile_error": decoder.compile_error, "graph_error": decoder.graph_error,
                               "captures": decoder.stats["captures"],
                               "capture_s": round(decoder.stats["capture_s"], 1)}
        record("thinktime", label, n, n * new, warm_s, warmup=extra_warmup + cold_s - warm_s)
        checks[f"{label}_shape_ok"] = len(warm) == n and all(len(r) == new for r in warm)
        checks[f"{label}_repeatable"] = cold == warm
        return warm

    # Plain generate, then the fast decoder, per configuration (the most telling figures first).
    try:
        run_generate(model, prompt[:32], 1, 4, True)  # CUDA context, cuBLAS handles: not counted
        scores: list = []
        reference, seconds = run_generate(model, prompt, 1, new, True, scores=scores)
    except Exception as exc:  # without the reference nothing else can be compared: say why and stop
        checks["generate_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"  generate FAILED {checks['generate_error']}", flush=True)
        save()
        return 1
    record("generate", "batch 1 greedy", 1, new, seconds)
    save()
    started = time.perf_counter()
    decoder = fast.FastDecoder(model, compile=False if args.no_compile else None)
    setup_s = time.perf_counter() - started
    main_decoder = decoder
    info.update(fast_setup_s=round(setup_s, 2))
    warm = fast_run("batch 1 greedy", 1, True, 0, extra_warmup=setup_s)
    info.update(fast_compile=decoder.use_compile, fast_graphs=decoder.use_graphs)  # after its first calls
    if warm is not None:
        parted = fast_check.parting(reference[0], warm[0], scores)
        checks["greedy_equals_generate"] = parted is None
        if parted is not None:
            checks["first_difference"] = {"at": parted.at, "generate": parted.expected, "thinktime": parted.got,
                                          "generate_gap": round(parted.gap, 5),
                                          "bf16_steps": round(parted.steps, 2), "near_tie": parted.near_tie}
            print(f"  greedy outputs part at token {parted.at} of {new}; generate's scores there put its token "
                  f"{parted.gap:.4f} = {parted.steps:.1f} bf16 steps above thinktime's "
                  f"({'a near-tie under bf16 rounding' if parted.near_tie else 'NOT a near-tie: a bug'})", flush=True)
        else:
            print(f"  greedy outputs identical to generate ({new} tokens)", flush=True)
        # The engine's first-use check, as it runs on a first call: its cost against a default chain.
        try:
            started = time.perf_counter()
            found = fast_check.compare_with_generate(model, decoder, prompt, fast_check.CHECK_TOKENS)
            check_s = time.perf_counter() - started
        except Exception as exc:
            checks["first_use_check_error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            checks["first_use_check"] = "passed" if found is None else \
                f"{'near-tie' if found.near_tie else 'FAILED'} at {found.at}"
            solve_s = SOLVE_TOKENS * by_run("thinktime", "batch 1 greedy")["ms_per_step"] / 1e3
            info.update(first_use_check_s=round(check_s, 3),
                        first_use_check_pct_of_solve=round(check_s / solve_s * 100, 2))
            print(f"  first-use check ({fast_check.CHECK_TOKENS} tokens both ways): {checks['first_use_check']}, "
                  f"{check_s:.2f} s = {info['first_use_check_pct_of_solve']}% of a {SOLVE_TOKENS}-token batch-1 "
                  f"chain at this speed ({solve_s:.1f} s)", flush=True)
    save()
    for n in samples:
        label = f"n={n} sampled"
        if over_budget(label):
            continue
        _, seconds = run_generate(model, prompt, n, new, False)
        record("generate", label, n, n * new, seconds)
        warm = fast_run(label, n, False, 7)
        if warm is not None:
            checks[f"{label}_distinct"] = len({tuple(r) for r in warm})
        save()
    if args.cpu:  # the tiny model also checks several prompts of different lengths in one batch
        prompts = [prompt, prompt[:30], prompt[5:45]]
        batch = decoder.generate(prompts, n=1, max_new_tokens=new, greedy=True, stop_ids=(), pad_id=0)
        alone = [run_generate(model, p, 1, new, True)[0][0] for p in prompts]
        checks["mixed_lengths_equal_generate"] = batch == alone
    else:
        # Variants at batch 1: one scaled_dot_product_attention call instead of the two products (its
        # speed, and how long its greedy tokens agree with generate's); the graphs over eager kernels
        # (what torch.compile adds, and costs in warm-up).
        for label, options in (("batch 1 greedy, sdpa attention", dict(attention="sdpa")),
                               ("batch 1 greedy, no compile", dict(compile=False))):
            if over_budget(label):
                continue
            started = time.perf_counter()
            decoder = fast.FastDecoder(model, **options)
            warm = fast_run(label, 1, True, 0, extra_warmup=time.perf_counter() - started)
            if warm is not None:
                diff = fast_check.first_difference(reference[0], warm[0])
                checks[f"{label}_first_difference"] = "none" if diff is None else diff
    # The main decoder's (the variants' are under "decoders")
    info["fast_stats"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in main_decoder.stats.items()}
    info["compile_error"], info["graph_error"] = main_decoder.compile_error, main_decoder.graph_error
    save()
    print("\n" + table(), flush=True)
    ok = not any(k.endswith("_error") for k in checks) and all(v for k, v in checks.items()
                                                                 if k.endswith(("_shape_ok", "_repeatable")))
    if args.cpu:
        ok = ok and checks.get("greedy_equals_generate") and checks.get("mixed_lengths_equal_generate") and \
            checks.get("first_use_check") == "passed"
    elif not checks.get("greedy_equals_generate"):
        ok = ok and checks.get("first_difference", {}).get("near_tie", False)
    ok = ok and not str(checks.get("first_use_check", "")).startswith("FAILED")
    print("OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


def _table(info, rows_out, checks, decoders, samples, floor_ms, config_name, prompt_len, new) -> str:
    """The Markdown summary: one row per run, generate against thinktime, then the checks."""
    by = {(r["engine"], r["run"]): r for r in rows_out}
    lines = [f"{info['device']}, torch {info['torch']}, transformers {info['transformers']}, {config_name}, "
             f"{info['weight_gb']} GB {info['dtype']} weights, {prompt_len}-token prompt, {new} new tokens, "
             f"{info['date']}" + (f"; copy bandwidth {info['copy_bandwidth_tb_s']} TB/s, floor "
                                  f"{info['floor_ms_per_step']} ms/token" if floor_ms else ""),
             "",
             "| run | generate tok/s | thinktime tok/s | speed-up | thinktime ms/step | % of floor | warm-up s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in ["batch 1 greedy"] + [f"n={n} sampled" for n in samples] + \
            ["batch 1 greedy, sdpa attention", "batch 1 greedy, no compile"]:
        g, t = by.get(("generate", label)) or by.get(("generate", label.split(",")[0])), by.get(("thinktime", label))
        if t is None and f"{label}_error" not in checks:
            continue
        gt = g["tok_s"] if g else "-"
        if t is None:
            lines.append(f"| {label} | {gt} | failed | - | - | - | - |")
            continue
        lines.append(f"| {label} | {gt} | {t['tok_s']} | " + (f"{t['tok_s'] / g['tok_s']:.1f}x" if g else "-")
                     + f" | {t['ms_per_step']} | {t['floor_pct'] if t['floor_pct'] is not None else '-'} | "
                     f"{t['warmup_s']} |")
    first = decoders.get("batch 1 greedy", {})
    lines += ["", "checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()),
              f"fast decoder (batch 1 greedy): compile={first.get('compile')} graphs={first.get('graphs')} "
              f"captures={first.get('captures')} capture_s={first.get('capture_s')}"
              + (f" compile_error={first['compile_error']}" if first.get("compile_error") else "")
              + (f" graph_error={first['graph_error']}" if first.get("graph_error") else ""),
              f"total {info.get('total_s')} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
