"""What the timed choices of kernels and weight types share: the CPU they ran on, and their verdicts kept in a
JSON file under THINKTIME_HOME (written atomically, so a reader never sees half a file)."""
from __future__ import annotations

import json
import logging
import os

from thinktime import models

log = logging.getLogger(__name__)


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its instruction-set flags (the platform's processor name off Linux)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for key, _, value in (line.partition(":") for line in f):
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        import platform

        name = platform.processor() or platform.machine()
    return name or "unknown CPU", flags


def read_verdicts(file: str) -> dict:
    """Verdicts by key; {} where the file is missing or unreadable (the next timing rewrites it)."""
    try:
        verdicts = json.loads((models.home() / file).read_text()).get("verdicts")
    except (OSError, ValueError, AttributeError):
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def write_verdict(file: str, key: str, verdict: dict) -> None:
    path = models.home() / file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps({"verdicts": read_verdicts(file) | {key: verdict}}, indent=1, sort_keys=True))
        partial.replace(path)  # atomic: a reader never sees half a file
    except OSError as exc:
        log.warning("thinktime: could not keep a timing's verdict in %s: %s", path, exc)
