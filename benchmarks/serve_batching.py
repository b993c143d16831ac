"""The server's micro-batching against the same server taking requests one at a time, in one run.

    .venv/bin/python benchmarks/serve_batching.py [--clients 8] [--tokens 32] [--rounds 3]

Starts `thinktime serve`'s app twice on the loopback over one loaded engine (the embedded model):
once as shipped (compatible non-streaming requests share one `generate` call) and once with
`max_batch=1` (every request alone, in turn). Each round sends `--clients` concurrent greedy
non-streaming requests through the official `openai` client and times until all are answered; the
two servers alternate rounds so a shared machine's load drifts alike for both. Prints wall time,
completion tokens per second, engine calls, and the ratio batched / one-at-a-time.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    import openai
    import torch

    from thinktime import Thinker
    from thinktime.server.app import ServerConfig, create_app
    from thinktime.server.background import BackgroundServer

    thinker = Thinker(args.model, max_new_tokens=args.tokens)
    servers = {"batched": BackgroundServer(create_app(thinker, ServerConfig())).start(),
               "one at a time": BackgroundServer(create_app(thinker, ServerConfig(max_batch=1))).start()}
    questions = [f"Question {i}: what is {i + 11} plus {2 * i + 5}?" for i in range(args.clients)]
    totals = {name: [0.0, 0] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, server in servers.items():
                client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0, timeout=600)

                def ask(question: str):
                    return client.chat.completions.create(model=thinker.model_name, max_tokens=args.tokens,
                                                          messages=[{"role": "user", "content": question}])

                started = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    replies = list(pool.map(ask, questions))
                totals[name][0] += time.perf_counter() - started
                totals[name][1] += sum(r.usage.completion_tokens for r in replies)
        print(f"{args.clients} concurrent greedy requests x {args.tokens} tokens, {args.rounds} rounds, "
              f"{args.model}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch threads {torch.get_num_threads()}")
        rates = {}
        for name, server in servers.items():
            seconds, tokens = totals[name]
            stats = server.app.state.service.scheduler.stats
            rates[name] = tokens / seconds
            print(f"  {name:14s} {seconds / args.rounds:7.2f} s per round  {rates[name]:7.1f} tokens/s  "
                  f"engine calls {stats['engine_calls']}  largest batch {stats['largest_batch']}")
        print(f"  ratio batched / one at a time: {rates['batched'] / rates['one at a time']:.2f}x")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
