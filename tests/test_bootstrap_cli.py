"""`thinktime bootstrap` and `thinktime train` on the command line: help, and bad input before any model loads."""
from __future__ import annotations

import subprocess
import sys


def thinktime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinktime.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_options():
    result = thinktime("bootstrap", "--help")
    assert result.returncode == 0
    for flag in ("--rounds", "--samples", "--engine", "--output", "--compare-n", "--from", "--train-data"):
        assert flag in result.stdout
    result = thinktime("train", "--help")
    assert result.returncode == 0 and "--lora" in result.stdout and "--data" in result.stdout


def test_bad_input_exits_2(tmp_path):
    result = thinktime("train", "ppo", "--data", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "m"))
    assert result.returncode == 2 and "unknown training method" in result.stderr
    result = thinktime("bootstrap", "--temperature", "0", "-o", str(tmp_path / "b"))
    assert result.returncode == 2 and "temperature" in result.stderr
    result = thinktime("bootstrap", "--from", "nowhere", "--model", "smollm2-135m", "-o", str(tmp_path / "c"))
    assert result.returncode == 2 and "--from" in result.stderr
