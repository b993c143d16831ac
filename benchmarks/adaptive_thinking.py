"""Tokens where they pay: stopping rules for self-consistency against SC@16, on one set of sampled chains.

    .venv/bin/python benchmarks/adaptive_thinking.py --dataset arith:1 --limit 100 --out runs/adaptive-arith1
    .venv/bin/python benchmarks/adaptive_thinking.py --dataset gsm8k --limit 50 --out runs/adaptive-gsm8k

Samples 16 chains per problem once on the llama.cpp engine (the embedded model, thinking prompt, T=0.7,
seeded, top-5 log-probabilities per token; resumable: OUT/chains.jsonl), probes every chain for its answer
every 32 tokens as Dynasor-CoT does (OUT/probes.jsonl), then replays each rule over
those same chains: a rule that stops a chain early counts its tokens up to the stop, one that samples
fewer chains counts those it drew. Rules: maj@k (k = 1..16); adaptive consistency (rounds of 4, the
Beta rule at 0.95, as `-s self-consistency -o round=4`); DeepConf confidence-weighted voting over 16;
DeepConf online (4 warm-up chains, later ones stopped below the threshold they set; keep 0.9 and 0.1),
alone and with adaptive consistency; probing (a chain stops once two successive probes agree; every probe's
tokens count), over 16 and with adaptive consistency; and per-question allocation at a quarter and a third of SC@16's
tokens, first 4 / step 4 and first 2 / step 2, replayed through Thinker.solve_allocated itself over the stored chains
(`Replay` hands each call its question's next chains, cut to the call's token limit; batches of 20 problems share a
budget as in `thinktime eval -s allocation`). Prints accuracy
(95% Wilson interval) and tokens per problem for each, the ratio to SC@16's tokens, and whether the
accuracy is within SC@16's interval; writes OUT/report.md and OUT/accuracy_vs_tokens.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from thinktime.engines.base import Engine

N, ROUND, WARM, WINDOW, TOP = 16, 4, 4, 32, 5
PROBE_EVERY, PROBE_AGREE = 32, 2  # the probing rule as `-s self-consistency -o probe=32` runs it
BATCH = 20  # problems sharing one allocation budget, as `thinktime eval --batch-problems` has it
END = "<|im_end|>"  # the embedded model's end-of-turn piece, which the stored pieces keep


def sample(args, out: Path) -> list[dict]:
    """16 chains per problem with their token confidences, then their probes (see `probe`); both appended per
    problem, so a rerun resumes. The records, each with its chains and probes."""
    from tqdm import tqdm

    from thinktime import Thinker
    from thinktime.confidence import token_confidence
    from thinktime.evaluation.datasets import load_dataset
    from thinktime.evaluation.grading import grade
    from thinktime.strategies.base import to_candidate
    from thinktime.types import Prompt, SamplingParams

    path = out / "chains.jsonl"
    done = {json.loads(line)["id"] for line in path.open()} if path.is_file() else set()
    problems = [p for p in load_dataset(args.dataset, limit=args.limit).problems]
    todo = [p for p in problems if p.id not in done]
    thinker = Thinker(engine="llamacpp", max_new_tokens=args.max_new_tokens)
    with path.open("a") as f, tqdm(total=len(problems), initial=len(problems) - len(todo), desc="sampling") as bar:
        for start in range(0, len(todo), args.batch):
            batch = todo[start:start + args.batch]
            prompts = [Prompt.of(thinker.messages(p.question)) for p in batch]
            seeds = tuple(args.seed + problems.index(p) for p in batch)
            params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.7, n=N, seeds=seeds,
                                    logprobs=TOP)
            for problem, row in zip(batch, thinker.engine.generate(prompts, params)):
                chains = []
                for completion in row:
                    candidate = to_candidate(completion)
                    chains.append({"answer": candidate.answer, "method": candidate.answer_method,
                                   "finish": completion.finish_reason, "tokens": completion.completion_tokens,
                                   "correct": grade(candidate.answer, problem.gold).correct,
                                   "conf": [round(token_confidence(t.top), 4) for t in completion.logprobs],
                                   "pieces": [t.text for t in completion.logprobs]})
                f.write(json.dumps({"id": problem.id, "gold": problem.gold, "chains": chains}) + "\n")
                f.flush()
                bar.update(1)
    probe(thinker, problems, out)
    thinker.engine.close()
    records = {r["id"]: r for r in map(json.loads, path.open())}
    probes = {r["id"]: r["probes"] for r in map(json.loads, (out / "probes.jsonl").open())}
    return [{**records[p.id], "probes": probes[p.id]} for p in problems if p.id in records and p.id in probes]


def probe(thinker, problems, out: Path) -> None:
    """Dynasor's probes of every chain, every PROBE_EVERY tokens while it is still thinking: the chain's text so far
    and "the final answer is \\boxed{", answered greedily as strategies/probing.py asks (resumable: OUT/probes.jsonl)."""
    from tqdm import tqdm

    from thinktime.answers import extract_answer
    from thinktime.evaluation.grading import grade
    from thinktime.strategies.probing import PROBE_TOKENS, PROBES
    from thinktime.types import Prompt, SamplingParams

    path = out / "probes.jsonl"
    done = {json.loads(line)["id"] for line in path.open()} if path.is_file() else set()
    chains = {r["id"]: r for r in map(json.loads, (out / "chains.jsonl").open())}
    todo = [p for p in problems if p.id in chains and p.id not in done]
    params = SamplingParams(max_new_tokens=PROBE_TOKENS, temperature=0.0, stop=("}",))
    with path.open("a") as f, tqdm(total=len(problems), initial=len(problems) - len(todo), desc="probing") as bar:
        for problem in todo:
            record, asks = chains[problem.id], []
            for c, chain in enumerate(record["chains"]):
                asks += [(c, at) for at in range(PROBE_EVERY, chain["tokens"], PROBE_EVERY)]
            base = Prompt.of(thinker.messages(problem.question))
            prompts = [Prompt(base.messages, base.prefix + "".join(record["chains"][c]["pieces"][:at]) + PROBES["en"])
                       for c, at in asks]
            answers = thinker.engine.generate(prompts, params) if prompts else []
            probes: list[list] = [[] for _ in record["chains"]]
            for (c, at), (completion,) in zip(asks, answers):
                answer = extract_answer(PROBES["en"] + completion.text + "}").value
                probes[c].append([at, answer, completion.completion_tokens,
                                  answer is not None and grade(answer, problem.gold).correct])
            f.write(json.dumps({"id": problem.id, "probes": probes}) + "\n")
            f.flush()
            bar.update(1)


# --- replaying the rules over stored chains ------------------------------------------------------------

class Chain:
    """A stored chain as the voting code sees a candidate."""

    def __init__(self, d: dict, stop_at: int | None = None):
        self.answer, self.answer_method, self.correct = d["answer"], d["method"], d["correct"]
        self.finish_reason = "low_confidence" if stop_at is not None else d["finish"]
        self.tokens = d["tokens"] if stop_at is None else stop_at
        self.conf = d["conf"]


def lowest(conf: list[float], window: int = WINDOW) -> float:
    from thinktime.confidence import lowest_mean

    return lowest_mean(conf, window) if conf else 0.0


def first_drop(conf: list[float], level: float, window: int = WINDOW) -> int | None:
    """Tokens generated when the running window mean first falls below `level` (as the engine stops), or None."""
    total = 0.0
    for i, value in enumerate(conf):
        total += value - (conf[i - window] if i >= window else 0.0)
        if i + 1 >= window and total / window < level:
            return i + 1
    return None


def vote(chains: list[Chain], weighted: bool = False, keep: float = 1.0):
    """The chosen chain's correctness under thinktime's own voting (math-equivalence groups, guesses, ties)."""
    from thinktime.voting import group_answers, vote_answers

    answers = [None if c.finish_reason == "low_confidence" else a for a, c in zip(vote_answers(chains), chains)]
    scores = [lowest(c.conf) for c in chains]
    if keep < 1.0:
        ranked = sorted((s for s, a in zip(scores, answers) if a is not None), reverse=True)
        if ranked:
            cut = ranked[max(1, round(keep * len(ranked))) - 1]
            answers = [a if s >= cut else None for a, s in zip(answers, scores)]
    groups = group_answers(answers, scores if weighted else None)
    chosen = chains[groups[0].members[0]] if groups else chains[0]
    return chosen.correct, groups


def settled(groups, remaining: int) -> bool:
    from thinktime.strategies.self_consistency import stop_reason

    return stop_reason(groups, remaining, 0.95) is not None


def online(record: dict, keep: float, adaptive: bool) -> tuple[bool, int]:
    """DeepConf online: warm-up chains in full set the threshold, later chains stop below it."""
    from thinktime.confidence import threshold

    chains = [Chain(d) for d in record["chains"][:WARM]]
    level = threshold([lowest(c.conf) for c in chains], keep)
    for start in range(WARM, N, ROUND):
        if adaptive and settled(vote(chains, True, keep)[1], N - len(chains)):
            break
        for d in record["chains"][start:start + ROUND]:
            chains.append(Chain(d, first_drop(d["conf"], level)))
    return vote(chains, True, keep)[0], sum(c.tokens for c in chains)


def probed(d: dict, probes: list) -> Chain:
    """A chain stopped at its first `PROBE_AGREE` agreeing probes (the last one its answer); all probe tokens count."""
    from thinktime.answers import equivalent

    chain = Chain(d)
    for i in range(PROBE_AGREE - 1, len(probes)):
        recent = [p[1] for p in probes[i - PROBE_AGREE + 1:i + 1]]
        if recent[0] is not None and all(equivalent(recent[0], a) for a in recent[1:]):
            chain.answer, chain.answer_method, chain.correct = recent[-1], "boxed", probes[i][3]
            chain.finish_reason, chain.tokens = "stop", probes[i][0] + sum(p[2] for p in probes[:i + 1])
            return chain
    chain.tokens += sum(p[2] for p in probes)
    return chain


def adaptive(record: dict, probing: bool = False) -> tuple[bool, int]:
    def make(c: int) -> Chain:
        d = record["chains"][c]
        return probed(d, record["probes"][c]) if probing else Chain(d)

    chains: list[Chain] = []
    for start in range(0, N, ROUND):
        chains += [make(c) for c in range(start, min(N, start + ROUND))]
        groups = vote(chains)[1]
        if len(chains) < N and settled(groups, N - len(chains)):
            break
    return vote(chains)[0], sum(c.tokens for c in chains)


class Replay(Engine):
    """The stored chains as an engine, so that the allocation strategy's own code decides who gets what: each call
    for a question hands out its next stored chains, cut to the call's token limit."""

    name, model_name, context_length, device = "replay", "replay", None, "cpu"

    def __init__(self, records: list[dict], questions: dict[str, str]):
        self.waiting = [(questions[r["id"]], r["chains"]) for r in records]
        self.chains: dict[int, list] = {}  # by prompt: a set may ask the same question twice
        self.drawn: dict[int, int] = {}

    def render(self, prompt) -> str:
        return prompt.prefix

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, params, cancel=None):
        from thinktime.types import Completion

        rows = []
        for prompt in prompts:
            key = id(prompt)
            if key not in self.chains:
                at = next(i for i, (q, _) in enumerate(self.waiting) if q == prompt.messages[-1]["content"])
                self.chains[key], self.drawn[key] = self.waiting.pop(at)[1], 0
            start = self.drawn[key]
            self.drawn[key] += params.n
            row = []
            for d in self.chains[key][start:start + params.n]:
                pieces = d["pieces"][:params.max_new_tokens]
                cut = len(pieces) < d["tokens"]
                text = "".join(pieces).removesuffix(END)
                row.append(Completion(text, "length" if cut else d["finish"], 0, len(pieces)))
            rows.append(row)
        return rows


def allocate(records: list[dict], questions: dict[str, str], tokens: int, first: int, step: int,
             max_new: int) -> tuple[int, float]:
    """`thinktime eval -s allocation -n TOKENS -o first=.. -o step=..` replayed: batches of 20 problems sharing TOKENS
    each, through Thinker.solve_allocated over the stored chains. Correct answers and tokens per problem."""
    from thinktime import Thinker
    from thinktime.evaluation.grading import grade

    correct, spent = 0, 0
    for start in range(0, len(records), BATCH):
        batch = records[start:start + BATCH]
        thinker = Thinker(engine=Replay(batch, questions), max_new_tokens=max_new)
        results = thinker.solve_allocated([questions[r["id"]] for r in batch], tokens * len(batch), first=first,
                                          step=step, most=N, temperature=0.7)
        correct += sum(grade(res.answer, r["gold"]).correct for res, r in zip(results, batch))
        spent += sum(res.usage.completion_tokens for res in results)
    return correct, spent / len(records)


def replay(records: list[dict], questions: dict[str, str], max_new: int) -> list[dict]:
    rows = []

    def add(name, results):
        correct = sum(c for c, _ in results)
        rows.append({"rule": name, "correct": correct, "tokens": sum(t for _, t in results) / len(results)})

    for k in (1, 2, 4, 8, 16):
        add(f"maj@{k}" if k > 1 else "one chain", [(vote([Chain(d) for d in r["chains"][:k]])[0],
                                                   sum(d["tokens"] for d in r["chains"][:k])) for r in records])
    add("adaptive consistency (round 4, 0.95)", [adaptive(r) for r in records])
    probed_all = [[probed(d, p) for d, p in zip(r["chains"], r["probes"])] for r in records]
    add(f"probing every {PROBE_EVERY} @16", [(vote(chains)[0], sum(c.tokens for c in chains)) for chains in probed_all])
    add(f"probing every {PROBE_EVERY} + adaptive", [adaptive(r, probing=True) for r in records])
    add("DeepConf weighted vote @16", [(vote([Chain(d) for d in r["chains"]], True)[0],
                                        sum(d["tokens"] for d in r["chains"])) for r in records])
    for keep in (0.9, 0.1):
        add(f"DeepConf online, keep {keep}", [online(r, keep, False) for r in records])
        add(f"DeepConf online, keep {keep} + adaptive", [online(r, keep, True) for r in records])
    sc16 = next(row["tokens"] for row in rows if row["rule"] == "maj@16")
    for first, step in ((4, 4), (2, 2)):
        for share in (4, 3):
            correct, tokens = allocate(records, questions, round(sc16 / share), first, step, max_new)
            rows.append({"rule": f"allocation, first {first}, step {step}, 1/{share} of SC@16's tokens",
                         "correct": correct, "tokens": tokens})
    return rows


def report(rows: list[dict], total: int, out: Path, title: str) -> str:
    from thinktime.evaluation.metrics import wilson

    sc = next(r for r in rows if r["rule"] == "maj@16")
    low, high = wilson(sc["correct"], total)
    lines = [f"# {title}", "", "| rule | accuracy | 95% interval | tokens/problem | tokens vs SC@16 | "
             "within SC@16's interval |", "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = wilson(r["correct"], total)
        acc = r["correct"] / total
        r.update(accuracy=acc, ratio=r["tokens"] / sc["tokens"], within=low <= acc <= high)
        lines.append(f"| {r['rule']} | {100 * acc:.0f}% | {100 * lo:.0f}-{100 * hi:.0f}% | {r['tokens']:.0f} | "
                     f"{r['ratio']:.2f} | {'yes' if r['within'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.axhspan(100 * low, 100 * high, color="0.9", label="SC@16's 95% interval")
    fixed = [r for r in rows if r["rule"].startswith(("maj", "one"))]
    ax.plot([r["tokens"] for r in fixed], [100 * r["accuracy"] for r in fixed], "-o", color="0.3", label="maj@k")
    for r in fixed:
        ax.annotate(r["rule"], (r["tokens"], 100 * r["accuracy"]), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    markers = "sDv^<>pPX*h"
    for i, r in enumerate(r for r in rows if r not in fixed):
        ax.scatter(r["tokens"], 100 * r["accuracy"], marker=markers[i % len(markers)], s=40, label=r["rule"])
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=130)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="arith:1")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="problems per engine call (x16 rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu_engines import cpu_name

    from thinktime.evaluation.datasets import load_dataset

    started = time.perf_counter()
    records = sample(args, args.out)
    questions = {p.id: p.question for p in load_dataset(args.dataset, limit=args.limit).problems}
    rows = replay(records, questions, args.max_new_tokens)
    title = (f"{args.dataset}, {len(records)} problems, SmolLM2-135M (llama.cpp, Q4_1), 16 chains at T=0.7, "
             f"{cpu_name()}, {time.strftime('%Y-%m-%d')}")
    print(report(rows, len(records), args.out, title))
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
