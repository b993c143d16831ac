"""A tree-pairs run folder: one searched tree per problem, kept crash-safe, and the data drawn from them.

    OUT/config.json     what changes a tree (model, prompt, dataset, search settings); its hash guards the folder
    OUT/trees.jsonl     one problem's tree per line, appended with one write and fsync (evaluation.store.RunStore)
    OUT/pairs.jsonl     step preference pairs {"id", "prompt", "prefix", "chosen", "rejected", "chosen_value",
                        "rejected_value"}
    OUT/sft.jsonl       the best correct chains as chat rows {"messages": [system, user, assistant], "id", "kind"}
                        (the rows of `thinktime bootstrap`'s sft.jsonl)
    OUT/summary.json    counts: problems, solved, problems with a pair, pairs, rows, tokens, seconds

A kill -9 loses at most the tree being searched: rerunning the command skips the recorded problems. The pair
filters (margin, similarity) and the SFT count are not part of the configuration: each run rewrites pairs.jsonl
and sft.jsonl from all recorded trees with the filters it was given.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from thinktime.errors import BadInputError
from thinktime.evaluation.grading import GRADER_VERSION
from thinktime.evaluation.store import RunStore, read_records
from thinktime.treesearch.pairs import PairFilter, best_chains, step_pairs
from thinktime.treesearch.search import TreeSettings, search_problem


TREES = "trees.jsonl"


class TreeStore(RunStore):
    records_name = TREES
    writer = "thinktime tree-pairs"


@dataclass
class TreeRun:
    """What one run of the command searches and how it draws data from the trees."""

    dataset: str
    split: str | None
    data_seed: int = 0
    search: TreeSettings = field(default_factory=TreeSettings)
    rules: PairFilter = field(default_factory=PairFilter)
    keep: int = 1  # SFT chains per problem
    budget: int | None = None  # generated tokens for the whole run folder, a resumed run's earlier trees included


def run_config(thinker, run: TreeRun) -> dict:
    """Everything that changes a tree; the pair filters and the number of problems are not in it."""
    probe = "|".join(m["content"] for q in ("1+1=?", "一加一等于几?") for m in thinker.messages(q)[:-1])
    engine = thinker.engine
    return {"kind": "tree-pairs", "model": thinker.model_name, "engine": getattr(engine, "name", type(engine).__name__),
            "dtype": str(getattr(engine, "dtype", "")),
            "system_prompt_sha": hashlib.sha256(probe.encode()).hexdigest()[:12],
            "lang": thinker.lang, "top_p": thinker.top_p, "dataset": run.dataset, "split": run.split,
            "data_seed": run.data_seed, "search": run.search.to_dict(), "grader": GRADER_VERSION}


def _same_problem(problems: dict) -> Callable[[dict], str | None]:
    def check(record: dict) -> str | None:
        if "tree" not in record:
            return "no tree"
        problem = problems.get(record["id"])
        if problem is not None and (problem.question, problem.gold) != (record.get("question"), record.get("gold")):
            return f"problem {record['id']} has another question or gold answer than the dataset now gives"
        return None
    return check


def tree_run(thinker, problems: Sequence, folder: Path, run: TreeRun,
             on_record: Callable[[dict], None] | None = None) -> dict:
    """Search every problem not yet recorded, one tree at a time, then write pairs, SFT rows and the summary."""
    with TreeStore(folder, run_config(thinker, run)) as store:
        store.records = read_records(folder, _same_problem({p.id: p for p in problems}), name=TREES)
        stopped = None
        for index, problem in enumerate(problems):
            if problem.id in store.done:
                continue
            budget = _left(run.budget, store.records)
            if budget == 0:
                stopped = "token budget spent"
                break
            record = search_problem(thinker, problem, index, run.search, budget)
            if record is None:
                stopped = "token budget spent"
                break
            store.append(record)
            if on_record:
                on_record(record)
        wanted = {p.id for p in problems}
        return export(folder, [r for r in store.records if r["id"] in wanted], run, stopped)


def _left(budget: int | None, records: list[dict]) -> int | None:
    if budget is None:
        return None
    return max(0, budget - sum(r["completion_tokens"] for r in records))


def export(folder: Path, records: list[dict], run: TreeRun, stopped: str | None = None) -> dict:
    """pairs.jsonl, sft.jsonl and summary.json from the recorded trees."""
    pairs, sft, with_pairs = [], [], 0
    for record in records:
        found = step_pairs(record["tree"], record["id"], record["question"], run.rules)
        with_pairs += bool(found)
        pairs.extend(found)
        for text, mean_q in best_chains(record["tree"], run.keep, run.search.delimiter):
            sft.append(sft_row(record, text, mean_q))
    write_jsonl(folder / "pairs.jsonl", pairs)
    write_jsonl(folder / "sft.jsonl", sft)
    summary = {"problems": len(records), "solved": sum(bool(r["solved"]) for r in records),
               "problems_with_pairs": with_pairs, "pairs": len(pairs), "sft_rows": len(sft),
               "pairs_per_problem": round(len(pairs) / len(records), 3) if records else 0.0,
               "nodes": sum(len(r["tree"]) - 1 for r in records),
               "completion_tokens": sum(r["completion_tokens"] for r in records),
               "seconds": round(sum(r["seconds"] for r in records), 1), "stopped": stopped,
               "filters": {"margin": run.rules.margin, "max_similarity": run.rules.max_similarity,
                           "per_side": run.rules.per_side, "keep": run.keep}}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def sft_row(record: dict, text: str, mean_q: float) -> dict:
    """A chat row as bootstrap writes them: the question as asked (system prompt, no hint), the chain as the reply."""
    return {"messages": [dict(m) for m in record["messages"]] + [{"role": "assistant", "content": text}],
            "id": record["id"], "kind": "tree", "value": mean_q}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """All rows at once, renamed into place: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def check_run(run: TreeRun) -> None:
    """Refuse settings that cannot give data, before any model loads."""
    s, rules = run.search, run.rules
    for name, value in (("--iterations", s.iterations), ("--expansions", s.expansions), ("--depth", s.depth),
                        ("--step-tokens", s.step_tokens), ("--rollouts", s.rollouts),
                        ("--rollout-tokens", s.rollout_tokens), ("--per-side", rules.per_side)):
        if value < 1:
            raise BadInputError(f"{name} must be at least 1")
    if run.keep < 0:
        raise BadInputError("--keep must be 0 (no SFT rows) or more")
    if s.temperature <= 0:
        raise BadInputError("--temperature must be above 0", hint="at 0 every expansion samples the same step")
    if s.exploration < 0:
        raise BadInputError("--exploration must be 0 or more")
    if not 0 <= rules.margin <= 2:
        raise BadInputError("--margin must be in [0, 2]", hint="Q values lie in [-1, 1]")
    if not 0 < rules.max_similarity <= 1:
        raise BadInputError("--max-similarity must be in (0, 1]", hint="1 keeps every pair but exact copies")
    if run.budget is not None and run.budget < 1:
        raise BadInputError("--budget must be at least 1 token")
