"""The embedded model's weights in other GGUF types, through thinktime's llama.cpp engine, on this CPU.

    .venv/bin/python benchmarks/gguf_types.py [--types Q4_1,Q4_0,Q8_0,F16,BF16] [--out FILE]

The shipped GGUF is Q4_1. llama.cpp multiplies a batch of rows with kernels that depend on the type
(repacked GEMM tiles for Q4_0, tinyBLAS for Q8_0 and F16, a dot product per row and column for Q4_1),
so one type can decode one chain fastest and another a batch. Each type is written from the shipped
file once (llama_model_quantize, requantising), then measured in a fresh process of its own (a second
llama.cpp context in a process runs slower): one greedy chain after the English thinking prompt,
n=8 samples of one prompt (self-consistency), and 64 distinct questions at once (a server's load);
decode tokens/s each, and the ratio to Q4_1 in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FTYPES = {"Q4_1": 3, "Q4_0": 2, "Q8_0": 7, "F16": 1, "BF16": 32}
NEW_TOKENS = {"one chain": 128, "n=8": 64, "64 questions": 24}


def write_type(source: str, kind: str, folder: str) -> str:
    """The shipped GGUF requantised to `kind` (kept in `folder`)."""
    import llama_cpp

    target = os.path.join(folder, f"smollm2-135m.{kind}.gguf")
    if kind == "Q4_1" or os.path.exists(target):
        return source if kind == "Q4_1" else target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FTYPES[kind], True, len(os.sched_getaffinity(0))
    if llama_cpp.llama_model_quantize(source.encode(), (target + ".partial").encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed")
    os.replace(target + ".partial", target)
    return target


def measure(path: str, threads: int | None) -> dict:
    """Decode tokens/s of the three loads on one engine over `path` (run in a process of its own)."""
    from cpu_engines import thinking_prompt

    from thinktime.engines.llamacpp import LlamaCppEngine
    from thinktime.types import Prompt, SamplingParams

    engine = LlamaCppEngine(path, threads=threads)
    prompt = thinking_prompt()
    questions = [Prompt.of([*prompt.messages[:1], {"role": "user", "content": f"What is {i + 11} plus {2 * i + 5}?"}])
                 for i in range(64)]
    loads = {"one chain": ([prompt], SamplingParams(max_new_tokens=NEW_TOKENS["one chain"])),
             "n=8": ([prompt], SamplingParams(max_new_tokens=NEW_TOKENS["n=8"], n=8, temperature=0.8, seed=1)),
             "64 questions": (questions, SamplingParams(max_new_tokens=NEW_TOKENS["64 questions"], temperature=0.8,
                                                        seed=1))}
    engine.generate(questions, SamplingParams(max_new_tokens=1))  # every prompt's KV cached: decode is timed
    figures = {}
    for name, (prompts, params) in loads.items():
        started = time.perf_counter()
        results = engine.generate(prompts, params)
        seconds = time.perf_counter() - started
        figures[name] = round(sum(c.completion_tokens for row in results for c in row) / seconds, 1)
    engine.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(FTYPES))
    parser.add_argument("--folder", default=None, help="where the written types are kept (THINKTIME_HOME/gguf-types)")
    parser.add_argument("--threads", type=int, help="llama.cpp's threads (default: every core this process may use)")
    parser.add_argument("--out")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this file, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.threads)))
        return

    from cpu_engines import cpu_name

    from thinktime import models

    source = str(models.resolve_gguf("smollm2-135m")[0])
    folder = args.folder or str(models.home() / "gguf-types")
    os.makedirs(folder, exist_ok=True)
    report = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "new_tokens": NEW_TOKENS,
              "rows": {}}
    print(f"# {report['cpu']}, {args.threads or 'all'} threads, {report['date']}: decode tokens/s of thinktime's "
          "llama.cpp engine", flush=True)
    for kind in args.types.split(","):
        path = write_type(source, kind, folder)
        threads = ["--threads", str(args.threads)] if args.threads else []
        child = subprocess.run([sys.executable, __file__, "--one", path, *threads], capture_output=True, text=True,
                               check=False)
        if child.returncode != 0:
            print(f"{kind}: failed\n{child.stderr[-2000:]}", flush=True)
            continue
        report["rows"][kind] = {"file_mb": round(os.path.getsize(path) / 1e6, 1),
                                **json.loads(child.stdout.strip().splitlines()[-1])}
        print(kind, json.dumps(report["rows"][kind]), flush=True)
    base = report["rows"].get("Q4_1")
    print("\n| type | file MB | " + " | ".join(f"{load} tok/s" for load in NEW_TOKENS) + " |")
    print("|---|---|" + "---|" * len(NEW_TOKENS))
    for kind, row in report["rows"].items():
        cells = [f"{row[load]}" + (f" ({row[load] / base[load]:.2f}x)" if base else "") for load in NEW_TOKENS]
        print(f"| {kind} | {row['file_mb']} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
