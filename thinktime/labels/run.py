"""The labelling loop: problems in batches, their chains sampled (or read), labelled, and written as they finish;
a budget of generated tokens checked between batches."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from thinktime.errors import BadInputError
from thinktime.evaluation.grading import GRADER_VERSION
from thinktime.labels.chains import Chain, sample_chains
from thinktime.labels.montecarlo import SEARCHES, label_chains, to_row
from thinktime.labels.rollouts import Roller
from thinktime.labels.store import LabelStore
from thinktime.strategies.steps import DEFAULT_DELIMITER


@dataclass
class LabelSettings:
    chains: int = 4  # sampled per problem
    rollouts: int = 4  # K, per step prefix
    search: str = "mc"  # every prefix, or binary search for the first wrong step
    seed: int = 0
    delimiter: str = DEFAULT_DELIMITER
    batch_problems: int | None = None  # problems per batch (default: about 64 rollouts per engine call)
    budget: int | None = None  # generated tokens for the whole run folder

    @property
    def per_batch(self) -> int:
        return self.batch_problems or max(1, 64 // (self.chains * self.rollouts))


def check_settings(settings: LabelSettings, temperature: float) -> None:
    """Refuse what cannot work, before any model loads."""
    for name, value in (("--chains", settings.chains), ("--rollouts", settings.rollouts)):
        if value < 1:
            raise BadInputError(f"{name} must be at least 1")
    if settings.search not in SEARCHES:
        raise BadInputError(f"unknown --search {settings.search!r}", hint=f"use one of {', '.join(SEARCHES)}")
    if settings.batch_problems is not None and settings.batch_problems < 1:
        raise BadInputError("--batch-problems must be at least 1")
    if settings.budget is not None and settings.budget < 1:
        raise BadInputError("--budget must be at least 1 token")
    if temperature <= 0 and (settings.rollouts > 1 or settings.chains > 1):
        raise BadInputError("greedy decoding draws identical chains and rollouts",
                            hint="sample with --temperature > 0 (e.g. 0.7)")


def build_config(thinker, settings: LabelSettings, source: dict) -> dict:
    """Everything that changes a label; its hash guards the run folder. --limit, --budget and the batch size
    are not in it (they change how much is labelled, not the labels)."""
    params = thinker.sampling()
    probe = "|".join(m["content"] for q in ("1+1=?", "一加一等于几?") for m in thinker.messages(q)[:-1])
    return {"kind": "labels", "model": thinker.model_name, "engine": getattr(thinker.engine, "name", ""),
            "dtype": str(getattr(thinker.engine, "dtype", "")), **source,
            "chains": settings.chains if "dataset" in source else None,  # stored chains: as many as stored
            "rollouts": settings.rollouts, "search": settings.search, "seed": settings.seed,
            "delimiter": settings.delimiter, "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p,
            "system_prompt_sha": hashlib.sha256(probe.encode()).hexdigest()[:12], "lang": thinker.lang,
            "grader": GRADER_VERSION}


def spent(store: LabelStore) -> int:
    return sum(int(r.get("tokens", 0)) for r in store.records)


def _label_batch(thinker, chains: list[Chain], store: LabelStore, settings: LabelSettings, sampled: int,
                 started: float) -> list[dict]:
    roller = Roller(thinker, settings.rollouts, settings.seed, settings.delimiter)
    done = store.done
    items = label_chains([c for c in chains if (c.problem.id, c.index) not in done], roller,
                         settings.search, settings.delimiter)
    seconds = time.perf_counter() - started
    total = (sampled + roller.tokens) or 1
    rows = []
    for item in items:  # each chain is charged its share of the batch's time, by the tokens it took
        if not item.steps:  # no text, nothing to label (a PRM trainer refuses rows without steps)
            continue
        row = to_row(item, settings.rollouts, settings.search, seconds * (item.chain.tokens + item.tokens) / total)
        store.append(row)
        rows.append(row)
    return rows


def run_labels(thinker, store: LabelStore, settings: LabelSettings, *, problems=None, chains=None,
               on_rows: Callable[[list[dict]], None] | None = None) -> str:
    """Label every chain not yet in `store`: `problems` to sample `settings.chains` chains each, or stored
    `chains`. Returns why it stopped: "done" or "budget"."""
    done = store.done
    if chains is not None:
        order = list(dict.fromkeys(c.problem.id for c in chains if (c.problem.id, c.index) not in done))
    else:
        order = [p.id for p in problems if any((p.id, i) not in done for i in range(settings.chains))]
    for start in range(0, len(order), settings.per_batch):
        if settings.budget is not None and spent(store) >= settings.budget:
            return "budget"
        batch = set(order[start:start + settings.per_batch])
        started = time.perf_counter()
        if chains is not None:
            todo, sampled = [c for c in chains if c.problem.id in batch], 0
        else:
            todo = sample_chains(thinker, [p for p in problems if p.id in batch], settings.chains, settings.seed)
            sampled = sum(c.tokens for c in todo)
        rows = _label_batch(thinker, todo, store, settings, sampled, started)
        if on_rows:
            on_rows(rows)
    return "done"
