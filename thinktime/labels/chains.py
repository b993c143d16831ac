"""The chains to label: sampled from a dataset's problems (train or held-out part), or read from a run folder
(`thinktime eval` records with their texts, or another labels folder: the same chains relabelled)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from thinktime.errors import BadInputError
from thinktime.evaluation.datasets import Problem
from thinktime.evaluation.runner import problem_seed
from thinktime.strategies.steps import DEFAULT_DELIMITER

@dataclass
class Chain:
    problem: Problem
    index: int  # among the problem's chains
    text: str
    finish: str  # the engine's finish reason: "stop" when the chain ended, "length" when cut
    tokens: int = 0  # generated to sample it (0 for chains read from a folder)


def sample_chains(thinker, problems: list[Problem], chains: int, seed: int) -> list[Chain]:
    """`chains` per problem in one engine call, each problem from its own seed (a resumed run draws the same)."""
    contexts = [thinker.context(p.question) for p in problems]
    params = replace(contexts[0].params, n=chains, seed=None, seeds=tuple(problem_seed(seed, p.id) for p in problems))
    outputs = thinker.engine.generate([c.prompt for c in contexts], params)
    return [Chain(p, i, c.text, c.finish_reason, c.completion_tokens)
            for p, completions in zip(problems, outputs) for i, c in enumerate(completions)]


def chains_from_folder(folder: Path) -> tuple[list[Chain], dict]:
    """The chains an eval run stored (each candidate's text) or a labels folder holds, and what names the source
    in the new run's configuration."""
    from thinktime.evaluation.store import read_config, read_records
    from thinktime.labels.store import LABELS, read_labels

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"--from {folder}: not a folder", hint="pass a run folder of `thinktime eval` (run "
                            "with texts kept) or of `thinktime label`")
    stored = read_config(folder)
    source = {"from": stored.get("hash"), "from_kind": "labels" if (folder / LABELS).is_file() else "eval"}
    if source["from_kind"] == "labels":
        chains = [Chain(Problem(r["id"], r["prompt"], str(r.get("gold", ""))), r.get("chain", 0),
                        DEFAULT_DELIMITER.join(r["completions"]), r.get("finish", "stop"))
                  for r in read_labels(folder)]
        if any(not c.problem.gold for c in chains):
            raise BadInputError(f"{folder} has rows without a gold answer", hint="label from a folder that "
                                "`thinktime label` wrote")
        return chains, source
    records = read_records(folder, check=_eval_record_problem)
    chains = [Chain(Problem(r["id"], r["question"], str(r["gold"])), i, c["text"], c.get("finish", "stop"))
              for r in records for i, c in enumerate(r["candidates"])]
    if not chains:
        raise BadInputError(f"{folder} holds no chains", hint="run `thinktime eval` into it first")
    return chains, source


def _eval_record_problem(record: dict) -> str | None:
    for field in ("question", "gold", "candidates"):
        if field not in record:
            return f"no {field!r}"
    if not isinstance(record["candidates"], list) or any(not isinstance(c, dict) or not isinstance(c.get("text"), str)
                                                          for c in record["candidates"]):
        return "chains without their text: the eval ran with --no-save-text"
    return None
