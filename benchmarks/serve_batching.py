"""The server under concurrent clients, as shipped against the same server taking requests one at a time.

    .venv/bin/python benchmarks/serve_batching.py [--clients 1,8,64] [--tokens 24] [--fuzz 1000]

Starts `thinktime serve`'s app twice on the loopback over one loaded engine (the embedded model on
the default engine, llama.cpp where installed; `--engine transformers` for the other): once as
shipped, once with `max_batch=1` (every request alone, in turn). For each number of clients, every
client sends one request at once through the official `openai` client, half of them streaming,
half of them seeded, all with the default thinking prompt. Per server and load: wall time, total
completion tokens/s, time to first token p50/p95 (streaming clients), inter-token latency p50 (between streamed chunks), lost or crossed answers (each must
come back, with its own question's prompt token count), and the ratio shipped / one at a time.
Time to first token is over the streaming clients (the first streamed text); the others' whole-answer
time is their latency. `--fuzz N` then runs the largest load once more on the shipped server while N
malformed requests arrive, and counts any 5xx (apart from the timed rows, which it would slow).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def one_request(client, model: str, question: str, tokens: int, stream: bool, seed: int | None) -> dict:
    kwargs = dict(model=model, max_tokens=tokens, messages=[{"role": "user", "content": question}],
                  temperature=0.8 if seed is not None else 0.0, seed=seed)
    started = time.perf_counter()
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        took = time.perf_counter() - started
        return {"ttft": took, "gaps": [], "tokens": reply.usage.completion_tokens,
                "prompt_tokens": reply.usage.prompt_tokens}
    first, last, gaps, usage = None, None, [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        text = "".join((getattr(c.delta, "reasoning_content", None) or "") + (c.delta.content or "")
                       for c in chunk.choices)
        if text:
            if first is None:
                first = now - started
            elif last is not None:
                gaps.append(now - last)
            last = now
    return {"ttft": first if first is not None else time.perf_counter() - started, "gaps": gaps,
            "tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens}


_ASKED = itertools.count(1)  # every load asks questions of its own: none is served from the last load's KV cache


def run_load(server, thinker, clients: int, tokens: int) -> dict:
    import openai

    from thinktime.types import Prompt

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=3600)
    first = next(_ASKED) * 1000
    questions = [f"Question {i}: what is {i + 11} plus {2 * i + 5}?" for i in range(first, first + clients)]
    expected = [thinker.engine.count_tokens(thinker.engine.render(Prompt.of(thinker.messages(q)))) for q in questions]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one_request, client, thinker.model_name, q, tokens, i % 2 == 0,
                               1000 + i if i % 4 < 2 else None) for i, q in enumerate(questions)]
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:  # counted as lost
                results.append({"error": repr(exc)})
    wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    crossed = sum(1 for r, e in zip(results, expected) if "error" not in r and r["prompt_tokens"] != e)
    streamed = sorted(r["ttft"] for i, r in enumerate(results) if "error" not in r and i % 2 == 0)
    whole = sorted(r["ttft"] for i, r in enumerate(results) if "error" not in r and i % 2 == 1)
    gaps = [g for r in ok for g in r["gaps"]]
    return {"clients": clients, "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "ttft_p50_s": _quantile(streamed, 0.5), "ttft_p95_s": _quantile(streamed, 0.95),
            "itl_p50_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
            "latency_p50_s": _quantile(whole, 0.5), "lost": len(results) - len(ok), "crossed": crossed}


def _quantile(values: list[float], q: float) -> float | None:
    """Time to first token is a streaming client's; a whole answer's time is its latency."""
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


def fuzz(url: str, count: int, out: dict) -> None:
    """Malformed and odd requests while the load runs: every answer must be below 500."""
    import httpx

    rng = random.Random(0)
    bodies = [b"{", b"[]", b'{"model": 3}', b'{"messages": "x"}', json.dumps({"messages": [{"role": "user"}]}).encode(),
              json.dumps({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": -1}).encode(),
              json.dumps({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}],
                          "n": 99}).encode(),
              json.dumps({"model": "smollm2-135m", "messages": [{"role": "bogus", "content": 5}]}).encode()]
    errors = 0
    with httpx.Client(timeout=600) as http:
        for _ in range(count):
            body = rng.choice(bodies)
            response = http.post(url + "/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"})
            errors += response.status_code >= 500
    out["fuzzed"], out["fuzz_5xx"] = count, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--fuzz", type=int, default=0)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()

    import httpx  # noqa: F401 - imported here, not first in the fuzzing thread while openai imports it too
    from cpu_engines import cpu_name

    from thinktime import Thinker
    from thinktime.server.app import ServerConfig, create_app
    from thinktime.server.background import BackgroundServer

    thinker = Thinker(args.model, engine=args.engine, max_new_tokens=args.tokens)
    servers = {"as shipped": BackgroundServer(create_app(thinker, ServerConfig(max_queue=256))).start(),
               "one at a time": BackgroundServer(create_app(thinker, ServerConfig(max_queue=256,
                                                                                   max_batch=1))).start()}
    weights = (getattr(thinker.engine, "gguf_type", None) or {}).get("type")  # the embedded GGUF's, on llama.cpp
    report = {"cpu": cpu_name(), "engine": thinker.engine.name, "model": thinker.model_name, "weights": weights,
              "tokens": args.tokens, "date": time.strftime("%Y-%m-%d"), "rows": []}
    print(f"# {report['cpu']}, {report['engine']} engine, {report['model']}"
          f"{f' ({weights} weights)' if weights else ''}, {args.tokens} new tokens per request, {report['date']}",
          flush=True)
    one_request(__import__("openai").OpenAI(base_url=servers["as shipped"].url + "/v1", api_key="-"),
                thinker.model_name, "warm up", 4, False, None)  # the system prompt's KV is cached from here on
    loads = [int(c) for c in args.clients.split(",")]
    try:
        for clients in loads:
            for name, server in servers.items():
                row = {"server": name, **run_load(server, thinker, clients, args.tokens)}
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
        if args.fuzz:
            extra: dict = {}
            fuzzer = threading.Thread(target=fuzz, args=(servers["as shipped"].url, args.fuzz, extra))
            fuzzer.start()
            row = {"server": "as shipped, fuzzed", **run_load(servers["as shipped"], thinker, max(loads), args.tokens)}
            fuzzer.join()
            report["fuzz"] = {**row, **extra}
            print(json.dumps(report["fuzz"]), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print("\n| server | clients | tokens/s | TTFT p50 s (streams) | TTFT p95 s | ITL p50 ms | latency p50 s "
          "(whole answers) | lost | crossed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} | "
              f"{r['itl_p50_ms']} | {r['latency_p50_s']} | {r['lost']} | {r['crossed']} |")
    if "fuzz" in report:
        f = report["fuzz"]
        print(f"{f['fuzzed']} malformed requests during {f['clients']} clients: {f['fuzz_5xx']} answered 5xx; "
              f"{f['lost']} lost, {f['crossed']} crossed")
    for clients in loads:
        by = {r["server"]: r for r in report["rows"] if r["clients"] == clients}
        ratio = by["as shipped"]["tokens_per_s"] / by["one at a time"]["tokens_per_s"]
        report.setdefault("ratios", {})[clients] = round(ratio, 2)
        print(f"{clients} clients: as shipped / one at a time = {ratio:.2f}x tokens/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
