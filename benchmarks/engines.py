"""Engines side by side: self-consistency N=8 over 20 `arith` problems with the embedded model,
through the transformers engine and the vLLM engine, in one run on one machine.

    .venv-vllm/bin/python benchmarks/engines.py            # both engines (needs vllm: make vllm-setup)
    .venv/bin/python benchmarks/engines.py --engines transformers

Measures, per engine: load time (weights already cached), time to the first streamed token of the
first request, and generated tokens per second over the self-consistency run (the same seeded
questions, N=8 chains each, adaptive stopping off so both engines do the same work, after one
untimed problem; the engines run one after another, each closed before the next loads), then the
ratios transformers / vLLM.
A separate process measures the transformers engine's cold start
(process start -> imports -> load -> first streamed token). Goals (issue 6): transformers >= 1.5x
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
    # (the CPU default is bf16 where the CPU multiplies it natively, as vLLM-CPU runs, else fp32).
    name, _, variant = kind.partition("+")
    options = {"fast": {"fast": True}, "bf16": {"dtype": "bf16"}, "fp32": {"dtype": "fp32"}, "": {}}[variant]
    started = time.perf_counter()
    engine = create_engine(name, "smollm2-135m", **options)
    load = time.perf_counter() - started
    return {"engine": kind, "instance": engine, "load_s": round(load, 2),
            "first_token_s": round(first_token_seconds(engine), 3), "tokens": 0, "generate_s": 0.0, "correct": 0,
            "device": engine.device, "dtype": str(getattr(engine, "dtype", "")) or _vllm_dtype(engine)}


def run_engine(row: dict, problems: list[dict], n: int, max_new_tokens: int, seed: int) -> None:
    """Every problem through one engine. Engines run one after another, each closed before the next
    loads: vLLM's CPU worker keeps a core busy polling for about a second after each request
    (measured: 20 of 20 ticks per 0.2 s, then 0), which would slow whatever ran next on 2 cores."""
    from thinktime import Thinker

    thinker = Thinker(engine=row["instance"], max_new_tokens=max_new_tokens, temperature=0.8, seed=seed,
                      strategy="self-consistency", options={"n": n, "confidence": 1.0})
    thinker.solve(WARM_UP)  # not timed: first-call costs (kernel set-up, caches) are not throughput
    for number, problem in enumerate(problems, 1):
        started = time.perf_counter()
        result = thinker.solve(problem["question"])
        row["generate_s"] += time.perf_counter() - started
        row["tokens"] += result.usage.completion_tokens
        row["correct"] += int(result.answer is not None and str(result.answer).strip() == str(problem["answer"]))
        if number % 5 == 0 or number == len(problems):
            print(f"  {row['engine']}: problem {number}/{len(problems)}, {row['tokens'] / row['generate_s']:.1f} tok/s",
                  flush=True)
    row["tokens_per_s"] = round(row["tokens"] / row["generate_s"], 1)
    row["generate_s"] = round(row["generate_s"], 1)
    row["problems"] = len(problems)
    row["load_avg_after"] = round(os.getloadavg()[0], 1)


def _vllm_dtype(engine) -> str:
    try:
        return str(engine.llm.llm_engine.model_config.dtype)
    except Exception:
        return ""


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
    for kind in args.engines.split(","):
        row = load_engine(kind.strip())
        print(f"{kind}: loaded in {row['load_s']} s, first streamed token {row['first_token_s']} s", flush=True)
        run_engine(row, problems, args.n, args.max_new_tokens, args.seed)
        row.pop("instance").close()
        report["engines"].append(row)
        print(json.dumps(row), flush=True)
    by = {r["engine"]: r for r in report["engines"]}
    if "vllm" in by:
        vl = by["vllm"]
        report["ratios"] = {}
        for name in (n for n in by if n.startswith("transformers")):
            hf = by[name]
            report["ratios"][name] = {
                "tokens_per_s vs vllm": round(hf["tokens_per_s"] / vl["tokens_per_s"], 2),
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
