"""Benchmarks by name: gsm8k, math500, aime24, aime25, cmath, and the generated `arith`.

Where the rows come from, in order: a local folder (`data_dir`, else $THINKTIME_DATA_DIR) holding
the JSONL copies named below; otherwise the set's public home through the `datasets` library.
A path to a .jsonl file is a custom set (fields question/problem/prompt and answer/solution).
Gold answers are parsed per set: GSM8K's `#### N`, MATH's `answer` (or the last \\boxed{} of the
solution), AIME's integer, CMATH's `answer`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from thinktime.errors import BadInputError, DownloadError
from thinktime.evaluation import arith

DATA_DIR_ENV = "THINKTIME_DATA_DIR"


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    gold: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Dataset:
    name: str
    split: str
    source: str  # a file path or a hub repo id, for the report
    problems: list[Problem]
    fingerprint: str  # changes when any id, question or gold answer changes

    def __len__(self) -> int:
        return len(self.problems)


@dataclass(frozen=True)
class _Spec:
    files: dict[str, str]  # split -> local file name
    hub: dict[str, tuple[str, tuple[str | None, ...], str]]  # split -> (repo, configs, hub split)
    parse: Callable[[dict, int, str], Problem]
    default_split: str = "test"


def _text(row: dict, *keys: str) -> str:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise BadInputError(f"a row has none of the fields {', '.join(keys)}", hint=f"row keys: {sorted(row)}")


def last_boxed(text: str) -> str | None:
    from thinktime.answers import find_boxed

    boxes = find_boxed(text)
    return boxes[-1][1] if boxes else None


def gsm8k_gold(solution: str) -> str:
    """GSM8K solutions end with `#### N`; N may carry thousands separators."""
    if "####" not in solution:
        raise BadInputError("a GSM8K answer has no '#### N' line", hint="is this the GSM8K 'main' config?")
    return solution.rsplit("####", 1)[1].strip().replace(",", "").rstrip(".")


def _gsm8k(row: dict, i: int, split: str) -> Problem:
    return Problem(f"gsm8k/{split}/{i}", _text(row, "question"), gsm8k_gold(_text(row, "answer")))


def _math500(row: dict, i: int, split: str) -> Problem:
    gold = str(row["answer"]).strip() if str(row.get("answer", "")).strip() else last_boxed(row.get("solution", ""))
    if not gold:
        raise BadInputError(f"MATH problem {i} has neither an answer field nor a \\boxed{{}} in its solution")
    meta = {k: row[k] for k in ("subject", "level") if k in row}
    return Problem(str(row.get("unique_id") or f"math500/{i}"), _text(row, "problem"), gold, meta)


def _aime(name: str) -> Callable[[dict, int, str], Problem]:
    def parse(row: dict, i: int, split: str) -> Problem:
        answer = row.get("answer")
        if answer is None or not str(answer).strip():
            raise BadInputError(f"{name} problem {i} has no answer")
        gold = str(answer).strip()
        if re.fullmatch(r"0*\d+", gold):
            gold = str(int(gold))  # AIME answers are integers 0-999; "033" is 33
        return Problem(f"{name}/{i}", _text(row, "problem", "question", "prompt"), gold)

    return parse


def _cmath(row: dict, i: int, split: str) -> Problem:
    answer = row.get("answer", row.get("golden"))
    if answer is None or not str(answer).strip():
        raise BadInputError(f"CMATH problem {i} has no answer")
    meta = {k: row[k] for k in ("grade", "reasoning_step") if k in row}
    return Problem(f"cmath/{split}/{i}", _text(row, "question"), str(answer).strip(), meta)


def _custom(row: dict, i: int, split: str) -> Problem:
    question = _text(row, "question", "problem", "prompt")
    gold = row.get("answer")
    if gold is None:  # an "answer": null beside a "gold" is no answer: the gold is
        gold = row.get("gold")
    if gold is not None and isinstance(gold, str) and "####" in gold:
        gold = gsm8k_gold(gold)
    if gold is None or not str(gold).strip():
        gold = last_boxed(str(row.get("solution", "")))
    if gold is None or not str(gold).strip():
        raise BadInputError(f"row {i + 1} has no gold answer",
                            hint="give each row an 'answer' field (or a 'solution' with \\boxed{})")
    return Problem(str(row.get("id", f"{split}/{i}")), question, str(gold).strip())


SPECS: dict[str, _Spec] = {
    "gsm8k": _Spec({"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl"},
                   {"test": ("openai/gsm8k", ("main",), "test"), "train": ("openai/gsm8k", ("main",), "train")},
                   _gsm8k),
    "math500": _Spec({"test": "math500_test.jsonl"}, {"test": ("HuggingFaceH4/MATH-500", (None,), "test")}, _math500),
    "aime24": _Spec({"test": "aime24.jsonl"}, {"test": ("HuggingFaceH4/aime_2024", (None,), "train")},
                    _aime("aime24")),
    "aime25": _Spec({"test": "aime25.jsonl"},
                    {"test": ("opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), "test")}, _aime("aime25")),
    "cmath": _Spec({"test": "cmath.jsonl"}, {"test": ("weitianwen/cmath", (None,), "test")}, _cmath),
}
NAMES = (*SPECS, "arith")


def _fingerprint(problems: list[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.question, p.gold], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BadInputError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
    return rows


def parse_arith_levels(name: str) -> tuple[int, ...]:
    """`arith` (all levels), `arith:1`, `arith:1-3`, `arith:2,4`."""
    spec = name.partition(":")[2].strip()
    if not spec:
        return arith.LEVELS
    levels: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            if int(hi or lo) < int(lo):  # "3-1": an empty range, not silently nothing
                raise ValueError(part)
            levels.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        levels = []
    if not levels or any(level not in arith.LEVELS for level in levels):
        raise BadInputError(f"bad arith levels {spec!r}", hint="use arith, arith:1, arith:1-3 or arith:2,4 (levels 1-5)")
    return tuple(dict.fromkeys(levels))


def _load_arith(name: str, limit: int | None, seed: int) -> Dataset:
    levels = parse_arith_levels(name)
    count = max(limit or 0, arith.DEFAULT_COUNT * len(levels))
    rows = arith.generate(levels, count, seed)
    problems = [Problem(r["id"], r["question"], r["answer"], {"level": r["level"]}) for r in rows]
    # The generator defines the set, so the fingerprint does not depend on how many were drawn.
    first = problems[: len(levels)]
    fingerprint = hashlib.sha256(json.dumps([list(levels), seed, _fingerprint(first)]).encode()).hexdigest()[:16]
    label = "arith" + (f":{','.join(map(str, levels))}" if levels != arith.LEVELS else "")
    return Dataset(label, "generated", f"generated (seed {seed})", problems, fingerprint)


def _local_file(name: str, split: str, data_dir: Path) -> Path | None:
    spec = SPECS[name]
    # A bare NAME.jsonl is the default split's only: read as another split (train), it would hand test
    # problems to what trains on them.
    bare = f"{name}.jsonl" if split == spec.default_split else None
    for candidate in (spec.files.get(split), f"{name}_{split}.jsonl", bare):
        if candidate and (data_dir / candidate).is_file():
            return data_dir / candidate
    return None


def _load_hub(name: str, split: str) -> tuple[list[dict], str]:
    repo, configs, hub_split = SPECS[name].hub[split]
    try:
        import datasets as hf_datasets
    except ImportError:
        raise DownloadError(f"loading {name} from its public home needs the `datasets` package",
                            hint="pip install datasets, or point --data-dir at local JSONL copies") from None
    rows: list[dict] = []
    try:
        for config in configs:
            rows.extend(dict(r) for r in hf_datasets.load_dataset(repo, config, split=hub_split))
    except Exception as exc:  # network, auth, a moved repo: say where it was looked for
        raise DownloadError(f"could not load {name} from {repo}: {type(exc).__name__}: {str(exc)[:200]}",
                            hint=f"without network access, put {SPECS[name].files.get(split, name + '.jsonl')} in a "
                                 f"folder and pass --data-dir (or set {DATA_DIR_ENV})") from None
    return rows, repo


def load_dataset(name: str, *, split: str | None = None, data_dir: str | Path | None = None,
                 limit: int | None = None, data_seed: int = 0) -> Dataset:
    """A benchmark by name (or a .jsonl path), with gold answers parsed; `limit` keeps the first K."""
    if limit is not None and limit < 1:
        raise BadInputError("--limit must be at least 1")
    key = name.strip().lower()
    if key == "arith" or key.startswith("arith:"):
        dataset = _load_arith(key, limit, data_seed)
    elif key.endswith(".jsonl") or Path(name).is_file():
        path = Path(name)
        if not path.is_file():
            raise BadInputError(f"dataset file not found: {path}", hint=f"or use a name: {', '.join(NAMES)}")
        rows = read_jsonl(path)
        problems = [_custom(row, i, path.stem) for i, row in enumerate(rows)]
        dataset = Dataset(path.stem, "file", str(path), problems, _fingerprint(problems))
    elif key in SPECS:
        spec = SPECS[key]
        split = split or spec.default_split
        if split not in spec.files and split not in spec.hub:
            raise BadInputError(f"{key} has no split {split!r}", hint=f"splits: {', '.join(spec.hub)}")
        folder = data_dir or os.environ.get(DATA_DIR_ENV)
        if folder:
            folder = Path(folder).expanduser()
            path = _local_file(key, split, folder)
            if path is None:
                raise BadInputError(f"{key} ({split}) not found in {folder}",
                                    hint=f"expected {spec.files.get(split, key + '.jsonl')} there; or unset "
                                         f"{DATA_DIR_ENV} / drop --data-dir to load it from its public home")
            rows, source = read_jsonl(path), str(path)
        else:
            rows, source = _load_hub(key, split)
        problems = [spec.parse(row, i, split) for i, row in enumerate(rows)]
        dataset = Dataset(key, split, source, problems, _fingerprint(problems))
    else:
        raise BadInputError(f"unknown dataset {name!r}",
                            hint=f"use one of {', '.join(NAMES)} (arith:1 for one level), or a path to a .jsonl file")
    if not dataset.problems:
        raise BadInputError(f"{dataset.source} holds no problems", hint="check the file: one JSON object per line, "
                            "each with a question and an answer")
    ids = [p.id for p in dataset.problems]
    if len(set(ids)) != len(ids):
        raise BadInputError(f"{dataset.source} has duplicate problem ids", hint="give each row a unique 'id'")
    if limit is not None:
        dataset.problems = dataset.problems[:limit]
    return dataset
