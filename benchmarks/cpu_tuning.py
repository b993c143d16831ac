"""The CPU kernels measured for this machine against plain transformers generate, and each hand-tuned piece alone.

    .venv/bin/python benchmarks/cpu_tuning.py [--rounds 3] [--tokens 64] [--json out.json] [--quick]

Loads the embedded model as plain `AutoModelForCausalLM` (fp32, sdpa, `generate`) and as the transformers
engine with: the kernels the engine measures here (a fresh timing, in a temporary THINKTIME_HOME: the
user's cache is not read or written), every piece off (fp32, nn.Linear, sdpa, the model's forward: what
is left is the engine's decoding loop and growing KV cache), each hand-tuned piece alone on top of that,
and all of them (THINKTIME_CPU_TUNING=0, as before the measurement). Prints tokens/s for one greedy chain and for
8 sampled rows of one question (n=8), the median of --rounds rounds that run every setting in turn (so
the drift of a shared machine falls on all alike), and each as a ratio to plain generate (issue 16: the
engine is never slower than it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import thinktime  # noqa: F401  (before torch: its OpenMP spin setting applies to every setting here)
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from thinktime import models
from thinktime.engines import cpu_tuning
from thinktime.engines.hf import TransformersEngine
from thinktime.types import Prompt, SamplingParams

MODEL = "smollm2-135m"

PROMPT = "Write a long story about a robot who learns to paint, with many details."
ALL_OFF = {"dtype": "fp32", "onednn": False, "decode_attention": False, "shared_prefix": False, "lean_step": False}
ALONE = {"+ oneDNN packing": {"onednn": True}, "+ bf16": {"dtype": "bf16"},
         "+ decode attention": {"decode_attention": True}, "+ shared prefix": {"shared_prefix": True},
         "+ shared prefix + lean step": {"shared_prefix": True, "lean_step": True}}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


def engine_with(verdict: dict | None):
    """The engine running `verdict` (written to the temporary cache first), or timing its kernels afresh where None;
    and its load time."""
    if verdict is not None:
        config = AutoConfig.from_pretrained(models.resolve(MODEL).path)
        cpu_tuning.write_cache(cpu_tuning.cache_key(config, {}), verdict)
    os.environ["THINKTIME_CPU_TUNING"] = "1" if verdict is not None else "refresh"
    started = time.perf_counter()
    engine = TransformersEngine(MODEL)
    return engine, time.perf_counter() - started


def engine_run(engine, rows: int, tokens: int) -> tuple[int, float]:
    params = SamplingParams(max_new_tokens=tokens) if rows == 1 else \
        SamplingParams(max_new_tokens=tokens, n=rows, temperature=0.8, seed=1)
    started = time.perf_counter()
    [chains] = engine.generate([Prompt.of([{"role": "user", "content": PROMPT}])], params)
    return sum(c.completion_tokens for c in chains), time.perf_counter() - started


def plain_run(model, tokenizer, ids, stop_ids, rows: int, tokens: int) -> tuple[int, float]:
    sampling = {"do_sample": False} if rows == 1 else {"do_sample": True, "temperature": 0.8, "top_p": 1.0}
    torch.manual_seed(1)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids.repeat(rows, 1), attention_mask=torch.ones_like(ids).repeat(rows, 1),
                             max_new_tokens=tokens, eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id,
                             top_k=None, **sampling)
    seconds = time.perf_counter() - started
    new = out[:, ids.shape[1]:].tolist()
    return sum(next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row)) for row in new), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="no single pieces: the measured choice, all off, all on")
    args = parser.parse_args()

    real_models = models.models_dir()  # the models stay where they are; the timing's cache goes to a new home
    home = Path(tempfile.mkdtemp(prefix="thinktime-cpu-tuning-"))
    (home / "models").symlink_to(real_models, target_is_directory=True)
    os.environ["THINKTIME_HOME"] = str(home)
    for name in ("THINKTIME_ONEDNN", "THINKTIME_LEAN_STEP"):
        os.environ.pop(name, None)

    measured, load_s = engine_with(None)
    settings = {"engine, measured choice": measured, "engine, every piece off": engine_with(ALL_OFF)[0]}
    settings |= {f"engine, {label}": engine_with(ALL_OFF | change)[0] for label, change in ALONE.items()
                 if not args.quick}
    os.environ["THINKTIME_CPU_TUNING"] = "0"
    settings["engine, all pieces on (the defaults)"] = TransformersEngine(MODEL)
    plain = AutoModelForCausalLM.from_pretrained(models.resolve(MODEL).path, dtype=torch.float32).eval()
    tokenizer = measured.tokenizer
    ids = tokenizer(measured.render(Prompt.of([{"role": "user", "content": PROMPT}])), return_tensors="pt",
                    add_special_tokens=False).input_ids

    runs = {label: {1: [], 8: []} for label in ["plain generate (fp32)", *settings]}
    started, ours, busy = time.perf_counter(), time.process_time(), cpu_tuning._busy_seconds()
    for _ in range(args.rounds):
        for rows in (1, 8):
            runs["plain generate (fp32)"][rows].append(plain_run(plain, tokenizer, ids, measured.stop_ids, rows,
                                                                 args.tokens))
            for label, engine in settings.items():
                runs[label][rows].append(engine_run(engine, rows, args.tokens))
    others = None  # the share of this machine's CPUs that other processes took meanwhile
    if busy is not None and (now := cpu_tuning._busy_seconds()) is not None:
        others = (now - busy - (time.process_time() - ours)) / (time.perf_counter() - started) / \
            len(os.sched_getaffinity(0))
    rates = {label: {rows: statistics.median(n / s for n, s in results) for rows, results in by_rows.items()}
             for label, by_rows in runs.items()}
    base = rates["plain generate (fp32)"]
    kernels = {k: v for k, v in measured.cpu_kernels.items() if k not in ("ms", "forced")}
    print(f"CPU: {cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"measured choice: {kernels} (engine load with the timing: {load_s:.1f} s)")
    print(f"tokens/s, median of {args.rounds} rounds; {args.tokens} new tokens; 8 rows = n=8 samples (temperature 0.8)"
          + ("" if others is None else f"; other processes had ~{max(others, 0):.0%} of the CPUs meanwhile"))
    print(f"{'setting':44} {'1 row':>8} {'8 rows':>8} {'1 row / plain':>14} {'8 rows / plain':>15}")
    for label, rate in rates.items():
        print(f"{label:44} {rate[1]:8.1f} {rate[8]:8.1f} {rate[1] / base[1]:14.2f} {rate[8] / base[8]:15.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(),
                                         "torch": torch.__version__, "measured": kernels,
                                         "others_cpu": others, "tokens_per_s": rates,
                                         "runs": {label: {rows: [[n, round(s, 3)] for n, s in results]
                                                          for rows, results in by_rows.items()}
                                                  for label, by_rows in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
