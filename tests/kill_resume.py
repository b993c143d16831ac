"""Killing a command-line run mid-way, for the resume tests: kill -9 once its log file holds a whole line."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def kill_after_first_line(command: list[str], log: Path, torn: bytes = b"") -> bytes:
    """Runs `command`, kills it (SIGKILL) once `log` has a whole line, then appends `torn` as if the kill had cut a
    write in two; returns the whole lines written before the kill."""
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and log.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert log.is_file(), "nothing written within the deadline"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = log.read_bytes()
    kept = before[: before.rfind(b"\n") + 1]
    if torn:
        with open(log, "ab") as f:
            f.write(torn)
    return kept


def resume(command: list[str]) -> subprocess.CompletedProcess:
    """The same command run again to its end."""
    resumed = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return resumed
