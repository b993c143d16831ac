"""Which GGUF type the embedded model runs in on this CPU, where asked to: timed once per CPU, threads and
llama.cpp version.

Why: the embedded model ships as Q4_1, and llama.cpp multiplies Q4_1 with a dot product per row and column
where Q8_0 and BF16 get GEMM kernels (tinyBLAS, AVX512-BF16): on one CPU Q8_0 prefills twice as fast and
decodes a batch 1.5x faster, on another it may not. Q8_0 and BF16 copies of the Q4_1 weights keep them
within 0.6% and 0.14% (RMS), so they are the candidates (Q4_0 would quantise again); their next-token
distributions still differ slightly (docs: performance), so the shipped file stays the default.
THINKTIME_GGUF_TYPE=auto writes each candidate once under THINKTIME_HOME/gguf-types, times a prompt's
prefill and one-token steps of 1 and 8 rows in a process of its own (a second llama.cpp context in a
process runs slower), and runs the type that finishes a typical job clearly soonest; the verdict is kept
in THINKTIME_HOME/gguf-choice.json. =refresh times again, =Q8_0 or =BF16 forces a type.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from thinktime import models
from thinktime.engines.timed_verdicts import cpu_model_and_flags, read_verdicts, write_verdict
from thinktime.errors import BadInputError

log = logging.getLogger(__name__)

CACHE_FILE = "gguf-choice.json"
FTYPES = {"Q8_0": 7, "BF16": 32}  # llama_ftype of each candidate
SHIPPED = "shipped"
MEASURES = ("prefill", "1 row", "8 rows")
# A typical job, in tokens of each measure: a thinking prompt read, one 200-token chain, eight sampled together
JOB_TOKENS = {"prefill": 500, "1 row": 200, "8 rows": 1600}
PROMPT_TOKENS, STEPS = 256, 12
MARGIN = 1.03  # a candidate must run the typical job this much faster than the shipped file: noise keeps it
BUSY = 0.15  # the shipped file timed twice differs by more: the machine was busy, the verdict is not kept
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8")


def cpu_name() -> str:
    """The CPU's model name and the instruction sets that decide which of llama.cpp's kernels run."""
    name, flags = cpu_model_and_flags()
    return " ".join([name, *sorted(flags & set(_FLAGS))])


def requested() -> str:
    """THINKTIME_GGUF_TYPE, checked: shipped (the default), auto, refresh, or a candidate type."""
    value = os.environ.get("THINKTIME_GGUF_TYPE", "").strip() or SHIPPED
    known = {"auto", "refresh", SHIPPED, *FTYPES}
    match = {name.lower(): name for name in known}.get(value.lower())
    if match is None:
        raise BadInputError(f"THINKTIME_GGUF_TYPE={value!r} is not one of {', '.join(sorted(known))}",
                            hint="auto times the types on this CPU; unset it for the shipped file")
    return match


def typed_file(source: Path, kind: str) -> Path:
    """The shipped GGUF written as `kind` under THINKTIME_HOME/gguf-types (once; a partial file is never used)."""
    if kind == SHIPPED:
        return source
    import llama_cpp

    target = models.home() / "gguf-types" / f"{source.stem}.{kind}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = FTYPES[kind], True, os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        partial.unlink(missing_ok=True)
        raise BadInputError(f"llama.cpp could not write {source.name} as {kind}",
                            hint="set THINKTIME_GGUF_TYPE=shipped to run the shipped file")
    partial.replace(target)
    return target


def cache_key(source: Path, threads: int) -> str:
    import llama_cpp

    return f"{cpu_name()} | {threads} threads | llama-cpp-python {llama_cpp.__version__} | " \
           f"{source.name} {source.stat().st_size}"


def choose(source: Path, threads: int) -> tuple[Path, dict]:
    """The file to run for the shipped `source` on this CPU, and the verdict (type, figures, where it came from)."""
    wanted = requested()
    if wanted not in ("auto", "refresh"):
        origin = "THINKTIME_GGUF_TYPE" if os.environ.get("THINKTIME_GGUF_TYPE", "").strip() else "default"
        return typed_file(source, wanted), {"type": wanted, "source": origin}
    key = cache_key(source, threads)
    verdict = read_verdicts(CACHE_FILE).get(key) if wanted == "auto" else None
    if isinstance(verdict, dict) and verdict.get("type") in (SHIPPED, *FTYPES):
        return typed_file(source, verdict["type"]), {**verdict, "source": "cached"}
    log.warning("thinktime: timing the embedded model's GGUF types on this CPU (once, about 10 s)")
    verdict = race(source, threads)
    if verdict["busy"]:
        log.warning("thinktime: the CPU was busy while timing GGUF types; using %s without keeping it", verdict["type"])
    else:
        write_verdict(CACHE_FILE, key, verdict)
    log.info("thinktime GGUF type (%s): %s %s", cpu_name(), verdict["type"], verdict["figures"])
    return typed_file(source, verdict["type"]), {**verdict, "source": "timed"}


def race(source: Path, threads: int) -> dict:
    """Each type timed in a process of its own, the shipped file first and last (to see a busy machine)."""
    order = [SHIPPED, *FTYPES, SHIPPED]
    runs = [(kind, time_file(typed_file(source, kind), threads)) for kind in order]
    first, last = runs[0][1], runs[-1][1]
    shipped = {m: max(first[m], last[m]) for m in MEASURES}
    busy = any(abs(first[m] - last[m]) > BUSY * max(first[m], last[m]) for m in MEASURES)
    figures = {SHIPPED: shipped, **{kind: figures for kind, figures in runs[1:-1]}}
    return {"type": pick(figures), "figures": figures, "busy": busy, "date": time.strftime("%Y-%m-%d")}


def pick(figures: dict[str, dict[str, float]]) -> str:
    """The type that runs a typical job (JOB_TOKENS) in the least time, if at least MARGIN faster than the shipped
    file; else the shipped file."""
    best, best_time = SHIPPED, job_seconds(figures[SHIPPED]) / MARGIN
    for kind in FTYPES:
        seconds = job_seconds(figures[kind])
        if seconds <= best_time:
            best, best_time = kind, seconds
    return best


def job_seconds(figures: dict[str, float]) -> float:
    return sum(tokens / figures[measure] for measure, tokens in JOB_TOKENS.items())


def time_file(path: Path, threads: int) -> dict[str, float]:
    child = subprocess.run([sys.executable, "-m", "thinktime.engines.gguf_choice", str(path), str(threads)],
                           capture_output=True, text=True, check=False, timeout=600)
    if child.returncode != 0:
        raise BadInputError(f"timing {path.name} failed: {child.stderr.strip()[-500:]}",
                            hint="set THINKTIME_GGUF_TYPE=shipped to run the shipped file without timing")
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure(path: Path, threads: int) -> dict[str, float]:
    """Tokens/s of a prompt's prefill and of one-token steps of 1 and 8 rows over it (run in a child process)."""
    from thinktime.engines.llamacpp_native import Native

    native = Native(path, cells=2048, sequences=9, threads=threads, batch_tokens=512)
    text = "A careful solver checks each step of the sum before writing the answer down. " * 24
    prompt = native.tokenize(text)[:PROMPT_TOKENS]
    native.decode(prompt[:32], list(range(32)), [8] * 32, [True] * 32)  # warm-up: buffers, threads
    native.truncate_sequence(8, 0)
    started = time.perf_counter()
    native.decode(prompt, list(range(len(prompt))), [0] * len(prompt), [False] * (len(prompt) - 1) + [True])
    figures = {"prefill": len(prompt) / (time.perf_counter() - started)}
    for rows in (1, 8):
        steps = []
        for step in range(STEPS):
            at = len(prompt) + step + (STEPS if rows == 8 else 0)
            started = time.perf_counter()
            native.decode([prompt[step]] * rows, [at] * rows, list(range(rows)), [True] * rows)
            steps.append(time.perf_counter() - started)
        if rows == 1:  # the 8-row steps start after the 1-row ones: every row holds the same positions
            for seq in range(1, 8):
                native.truncate_sequence(seq, 0)
                native.copy_sequence(0, seq, at + 1)
        figures[f"{rows} row" + ("s" if rows > 1 else "")] = rows / sorted(steps)[len(steps) // 2]
    native.close()
    return {name: round(value, 1) for name, value in figures.items()}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), int(sys.argv[2]))))
