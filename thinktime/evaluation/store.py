"""A run folder: its configuration (with a hash) and its per-problem records, crash-safe.

    RUN/config.json     the configuration, its hash, when it started; written once, atomically
    RUN/records.jsonl   one JSON line per finished problem, appended with one write() and fsync
    RUN/.lock           held while a process writes, so two evals never interleave

A `kill -9` can leave at most a torn last line: opening the run cuts it off, and the problems
already recorded are skipped. A different configuration in the same folder is refused rather
than mixed with the old records.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinktime.errors import BadInputError

CONFIG = "config.json"
RECORDS = "records.jsonl"
LOCK = ".lock"


def config_hash(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:6])


def read_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise BadInputError(f"{folder} is not a thinktime run (no {CONFIG})",
                            hint="pass the folder that `thinktime eval` printed (its --output)")
    return _read_json_object(path)


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path} is damaged: {exc}", hint="restore it, or move the run folder away and run the "
                            "eval again to redo it") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path} is damaged: not a JSON object", hint="restore it, or move the run folder away")
    return value


def _record_problem(record) -> str | None:
    """What makes a parsed records line unusable to the store (None: nothing)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    return None if "id" in record else "no id"


def record_key(record: dict):
    """What a record is one of: a problem (eval); other stores key by more (a problem's chain)."""
    return record.get("id")


def read_records(folder: Path, check: Callable[[dict], str | None] | None = None, name: str = RECORDS,
                 key: Callable[[dict], Any] = record_key) -> list[dict]:
    """The complete records of a run, first copy of each key; a torn last line is ignored. `check` says what
    else makes a record unusable to the caller (None: nothing), so that a damaged line is named, not a crash."""
    path = Path(folder) / name
    if not path.is_file():
        return []
    records, seen = [], set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # torn by a crash in the middle of a write
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = _record_problem(record) or (check(record) if check else None)
        except (json.JSONDecodeError, UnicodeDecodeError):
            problem = "not valid JSON"
        if problem is not None:
            raise BadInputError(f"{path} line {number} is damaged ({problem})",
                                hint="remove that line (or the folder) and run the eval again to redo it")
        if key(record) not in seen:
            seen.add(key(record))
            records.append(record)
    return records


class RunStore:
    """Opens (or creates) a run folder for writing; use as a context manager. Subclasses name another records
    file (`records_name`), key records by more than the problem (`key`) and say which command writes (`writer`)."""

    records_name = RECORDS
    writer = "thinktime eval"
    key = staticmethod(record_key)

    def __init__(self, folder: str | Path, config: dict[str, Any]):
        self.folder = Path(folder)
        self.config = config
        self.hash = config_hash(config)
        self.records: list[dict] = []
        self._fd: int | None = None
        self._lock_fd: int | None = None

    @property
    def done(self) -> set:
        return {self.key(r) for r in self.records}

    def __enter__(self) -> "RunStore":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        config_path = self.folder / CONFIG
        if config_path.is_file():
            try:
                stored = _read_json_object(config_path)
            except BadInputError:
                self.close()
                raise
            if stored.get("hash") != self.hash:
                self.close()
                raise BadInputError(
                    f"{self.folder} holds a run with a different configuration "
                    f"({_diff(stored.get('config', {}), self.config)})",
                    hint="its records would not be comparable: pass another --output folder, or leave --output out "
                         "(each configuration gets its own folder under runs/)")
        else:
            tmp = config_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"hash": self.hash, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "config": self.config}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, config_path)
        self._repair_tail()
        self.records = read_records(self.folder, name=self.records_name, key=self.key)
        self._fd = os.open(self.folder / self.records_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        """Write one finished problem: a single write() of one line, then fsync; duplicates are skipped."""
        if self.key(record) in self.done:
            return
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: undo the partial line so the file stays valid
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(f"short write to {self.folder / self.records_name} (disk full?)")
        os.fsync(self._fd)
        self.records.append(record)

    def close(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)  # closing the lock file releases the lock
                setattr(self, attr, None)

    def _take_lock(self) -> None:
        import fcntl

        self._lock_fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise BadInputError(f"another {self.writer} is writing to {self.folder}",
                                hint="wait for it to finish, or stop it; a killed eval releases the folder") from None

    def _repair_tail(self) -> None:
        """Cut a line torn by a crash, so the next append starts on a fresh line."""
        path = self.folder / self.records_name
        if not path.is_file() or path.stat().st_size == 0:
            return
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())
