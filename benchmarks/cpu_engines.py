"""CPU engines side by side on the embedded model, in one run on one machine:

    .venv/bin/python benchmarks/cpu_engines.py                 # all that are installed
    .venv/bin/python benchmarks/cpu_engines.py --out benchmarks/results/cpu-engines.json

Rows: thinktime's llama.cpp engine (the shipped Q4_1 GGUF), llama.cpp's own batched decode of the same
weights through llama-cpp-python's low-level API outside thinktime (the peer: the ratio shows what
thinktime's layer costs), thinktime's transformers engine, and plain `AutoModelForCausalLM.generate`
in fp32. Two loads: one greedy chain after the English thinking prompt (~500 prompt tokens), and N=8
sampled rows after a shared prompt (self-consistency's shape). For each: decode tokens/s, time to the
first token, and the share of the weight-read ceiling (this machine's read bandwidth, measured in
the same run, over the bytes of weights one decoding step reads). Each llama.cpp run has a process
of its own: a llama.cpp context decodes slower after another one has run in the same process.
Cold start: a fresh process, from interpreter start to the first streamed token of the llama.cpp engine. vLLM-CPU lives in its own
environment: benchmarks/engines.py measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date

QUESTION = "What is 17 + 25?"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({len(os.sched_getaffinity(0))} cores; {', '.join(extras) or 'no AVX512'})"


def read_bandwidth() -> float:
    """Bytes per second summing a 512 MB buffer (larger than any cache), best of 5."""
    import numpy as np

    buffer = np.ones(128 << 20, dtype=np.float32)
    best = float("inf")
    for _ in range(6):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.nbytes / best


def thinking_prompt():
    from thinktime import prompts
    from thinktime.types import Prompt

    return Prompt.of([{"role": "system", "content": prompts.thinking_prompt("en", 1024)},
                      {"role": "user", "content": QUESTION}])


# --- llama.cpp's own decode, outside thinktime --------------------------------------------------------

def llama_cpp_own(gguf: str, text: str, rows: int, new_tokens: int, temperature: float, threads: int) -> dict:
    """Prefill once in sequence 0, copy it to the other rows, decode all rows one token a step (greedy for one
    row, else temperature sampling), as llama-batched-bench does."""
    import llama_cpp

    model = llama_cpp.llama_model_load_from_file(gguf.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 8192, 2048, 2048, rows
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode()
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    count = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, True)
    prompt = list(buf[:count])
    batch = llama_cpp.llama_batch_init(max(len(prompt), rows), 0, 1)

    def fill(entries):
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(entries)

    samplers = []
    for row in range(rows):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(1234 + row))
        samplers.append(chain)
    started = time.perf_counter()
    fill([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
    llama_cpp.llama_decode(ctx, batch)
    memory = llama_cpp.llama_get_memory(ctx)
    for row in range(1, rows):
        llama_cpp.llama_memory_seq_cp(memory, 0, row, 0, len(prompt))
    tokens = [llama_cpp.llama_sampler_sample(samplers[r], ctx, len(prompt) - 1) for r in range(rows)]
    first = time.perf_counter() - started
    decode_started = time.perf_counter()
    for step in range(new_tokens - 1):  # every row runs to new_tokens: the same work at every step
        fill([(tokens[r], len(prompt) + step, r, True) for r in range(rows)])
        llama_cpp.llama_decode(ctx, batch)
        tokens = [llama_cpp.llama_sampler_sample(samplers[r], ctx, r) for r in range(rows)]
    decode_s = time.perf_counter() - decode_started
    for chain in samplers:
        llama_cpp.llama_sampler_free(chain)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"prompt_tokens": len(prompt), "first_token_s": first,
            "decode_tokens_per_s": rows * (new_tokens - 1) / decode_s}


# --- thinktime's engines and plain generate -------------------------------------------------------------

def engine_run(engine, prompt, rows: int, new_tokens: int, temperature: float) -> dict:
    """Streams sample 0 to time its first token; decode tokens/s over the rows' tokens after the first."""
    from thinktime.types import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, n=rows, seed=1234)
    started = time.perf_counter()
    first, tokens = None, 0
    for delta in engine.stream(prompt, params):
        if first is None and delta.text:
            first = time.perf_counter() - started
        if delta.completion is not None:
            tokens += delta.completion.completion_tokens
    total = time.perf_counter() - started
    return {"first_token_s": first, "tokens": tokens,
            "decode_tokens_per_s": (tokens - rows) / max(1e-9, total - (first or 0))}


def plain_generate(path, text: str, rows: int, new_tokens: int, temperature: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.repeat(rows, 1)
    sampling = dict(do_sample=False) if temperature <= 0 else dict(do_sample=True, temperature=temperature, top_p=1.0)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **sampling)
        first = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sampling)
        total = time.perf_counter() - started
    made = (out.shape[1] - ids.shape[1]) * rows
    return {"prompt_tokens": ids.shape[1], "first_token_s": first,
            "decode_tokens_per_s": (made - rows) / max(1e-9, total - first)}


def cold_start() -> float:
    code = ("from thinktime.engines.llamacpp import LlamaCppEngine\n"
            "from thinktime.types import Prompt, SamplingParams\n"
            "e = LlamaCppEngine('smollm2-135m')\n"
            f"for d in e.stream(Prompt.of([{{'role': 'user', 'content': {QUESTION!r}}}]), SamplingParams(max_new_tokens=8)):\n"
            "    if d.text: break\n")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200, help="new tokens for the one-chain load")
    parser.add_argument("--batch-tokens", type=int, default=64, help="new tokens per row for the N-row load")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is reported")
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out: transformers,generate")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--one", nargs=4, metavar=("KIND", "ROWS", "NEW", "TEMPERATURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one llama.cpp run, its figures as JSON
        kind, rows, new, temperature = args.one
        print(json.dumps(_one_llama_run(kind, int(rows), int(new), float(temperature), sys.stdin.read())))
        return

    from thinktime import models
    from thinktime.engines.llamacpp import LlamaCppEngine
    from thinktime.engines.llamacpp_native import default_threads

    threads = default_threads()
    gguf = str(models.embedded_gguf())
    report = {"date": date.today().isoformat(), "cpu": cpu_name(), "threads": threads,
              "read_bandwidth_gb_s": round(read_bandwidth() / 1e9, 1), "rows": []}
    print(f"# {report['cpu']}, {threads} threads, reads {report['read_bandwidth_gb_s']} GB/s, {report['date']}")
    prompt = thinking_prompt()
    llama = LlamaCppEngine("smollm2-135m")
    text = llama.render(prompt)
    loads = {"1 chain": (1, args.new_tokens, 0.0), f"N={args.n}": (args.n, args.batch_tokens, 0.8)}

    def measure(name, weight_bytes, run):
        for load, (rows, new, temperature) in loads.items():
            runs = [run(rows, new, temperature) for _ in range(args.repeat)]
            row = {"engine": name, "load": load, "rows": rows,
                   "decode_tokens_per_s": round(statistics.median(r["decode_tokens_per_s"] for r in runs), 1),
                   "first_token_s": round(statistics.median(r["first_token_s"] or 0 for r in runs), 3)}
            ceiling = rows * report["read_bandwidth_gb_s"] * 1e9 / weight_bytes
            row["percent_of_weight_read_ceiling"] = round(100 * row["decode_tokens_per_s"] / ceiling, 1)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)

    gguf_bytes = os.path.getsize(gguf)  # every tensor once; the tied head reads the embedding table in full
    llama.close()
    # A llama.cpp context decodes slower after another has run in the same process: each run has a process of its own.
    measure("llama.cpp own (llama-cpp-python low-level)", gguf_bytes,
            lambda rows, new, t: _in_child("own", rows, new, t, text))
    measure("thinktime llamacpp", gguf_bytes, lambda rows, new, t: _in_child("thinktime", rows, new, t, text))
    skip = set(filter(None, args.skip.split(",")))
    path = models.resolve("smollm2-135m").path
    if "transformers" not in skip:
        from thinktime.engines.hf import TransformersEngine

        hf = TransformersEngine("smollm2-135m")
        measure(f"thinktime transformers ({str(hf.dtype).replace('torch.', '')})",
                _hf_weight_bytes(path, hf.dtype.itemsize), lambda rows, new, t: engine_run(hf, prompt, rows, new, t))
        hf.close()
    if "generate" not in skip:
        measure("plain transformers generate (float32)", _hf_weight_bytes(path, 4),
                lambda rows, new, t: plain_generate(path, text, rows, new, t))
    report["cold_start_llamacpp_s"] = round(cold_start(), 2)
    print(f"cold start, process start to the first streamed token (llamacpp): {report['cold_start_llamacpp_s']} s")
    by = {(r["engine"], r["load"]): r for r in report["rows"]}
    print("\n| engine | load | decode tok/s | first token s | % of weight-read ceiling |\n|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['engine']} | {r['load']} | {r['decode_tokens_per_s']} | {r['first_token_s']} | "
              f"{r['percent_of_weight_read_ceiling']} |")
    for load in loads:
        ours, own = by[("thinktime llamacpp", load)], by[("llama.cpp own (llama-cpp-python low-level)", load)]
        ratio = ours["decode_tokens_per_s"] / own["decode_tokens_per_s"]
        report.setdefault("ratios", {})[load] = round(ratio, 2)
        print(f"{load}: thinktime llamacpp / llama.cpp own = {ratio:.2f}")
        plain = by.get(("plain transformers generate (float32)", load))
        if plain:
            print(f"{load}: thinktime llamacpp / plain generate = "
                  f"{ours['decode_tokens_per_s'] / plain['decode_tokens_per_s']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


def _one_llama_run(kind: str, rows: int, new: int, temperature: float, text: str) -> dict:
    """One run in this process, its only llama.cpp context: thinktime's engine, or llama.cpp's own loop on `text`
    (the rendered prompt, so that no other context renders it here first)."""
    from thinktime import models
    from thinktime.engines.llamacpp_native import default_threads

    if kind == "thinktime":
        from thinktime.engines.llamacpp import LlamaCppEngine

        return engine_run(LlamaCppEngine("smollm2-135m"), thinking_prompt(), rows, new, temperature)
    return llama_cpp_own(str(models.embedded_gguf()), text, rows, new, temperature, default_threads())


def _in_child(kind: str, rows: int, new: int, temperature: float, text: str) -> dict:
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", kind, str(rows), str(new),
                            str(temperature)], input=text, capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def _hf_weight_bytes(path, dtype_bytes: int) -> int:
    sys.path.insert(0, os.path.dirname(__file__))
    from engines import weight_bytes_per_step
    from transformers import AutoConfig

    return weight_bytes_per_step(AutoConfig.from_pretrained(path), dtype_bytes)


if __name__ == "__main__":
    main()
