"""The labels run folder and the label file format.

    RUN/config.json    the configuration and its hash (evaluation.store.RunStore)
    RUN/labels.jsonl   one JSON line per labelled chain, appended with one write() and fsync

A line is TRL's stepwise format plus extras: id (the problem), chain (its index among the problem's chains),
prompt (the question), completions (step texts), labels (hard: any rollout from the prefix ending with the
step reached the gold answer), soft_labels (the share that did), measured (rollouts were run from that
prefix; otherwise the label is the chain's own graded answer or inferred by binary search), gold, rollouts (K),
search ("mc" or "binary"). A chain is one key (id, chain): a resumed run labels only the chains not written.
"""
from __future__ import annotations

import json
from pathlib import Path

from thinktime.errors import BadInputError
from thinktime.evaluation.store import RunStore

LABELS = "labels.jsonl"


def chain_key(record: dict) -> tuple:
    return record.get("id"), record.get("chain", 0)


class LabelStore(RunStore):
    records_name = LABELS
    writer = "thinktime label"
    key = staticmethod(chain_key)


def row_problem(row) -> str | None:
    """What makes a labels line unusable (None: nothing): the fields every reader relies on."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for field in ("id", "prompt", "completions", "labels"):
        if field not in row:
            return f"no {field!r} field"
    steps, labels = row["completions"], row["labels"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        return "'completions' is not a list of step texts"
    if not isinstance(labels, list) or not all(isinstance(v, bool) for v in labels):
        return "'labels' is not a list of true/false"
    if len(labels) != len(steps):
        return f"{len(steps)} steps but {len(labels)} labels"
    soft = row.get("soft_labels")
    if soft is not None and (not isinstance(soft, list) or len(soft) != len(steps)
                             or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in soft)):
        return "'soft_labels' is not one share in [0, 1] per step"
    return None


def labels_path(path: str | Path) -> Path:
    """A labels file, or the run folder that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS
    if not path.is_file():
        raise BadInputError(f"no step labels at {path}", hint="pass a labels.jsonl file or the folder that "
                            "`thinktime label` wrote")
    return path


def read_labels(path: str | Path) -> list[dict]:
    """Every complete row of a labels file (a torn last line is left out); a malformed line is named."""
    path = labels_path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # torn by a crash in the middle of a write
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            problem = "not valid JSON"
        else:
            problem = row_problem(row)
        if problem is not None:
            raise BadInputError(f"{path} line {number} is malformed ({problem})",
                                hint="each line: {\"id\", \"prompt\", \"completions\": [steps], \"labels\": "
                                     "[true/false per step], ...} as `thinktime label` writes")
        rows.append(row)
    return rows
