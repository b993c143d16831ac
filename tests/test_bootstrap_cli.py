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
    result = thinktime("bootstrap", "--hint-samples", "0", "-o", str(tmp_path / "d"))
    assert result.returncode == 2 and "--hint-samples must be at least 1" in result.stderr
    result = thinktime("bootstrap", "--no-train", "--compare-n", "2", "-o", str(tmp_path / "e"))
    assert result.returncode == 2 and "--compare-n" in result.stderr


def test_train_refuses_settings_that_train_nothing_and_folders_it_would_empty(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}\n')
    for args, message in ((["--epochs", "0"], "--epochs must be above 0"), (["--batch-size", "0"], "--batch-size"),
                          (["--lr", "-1"], "--lr must be above 0")):
        result = thinktime("train", "sft", "--data", str(data), "-o", str(tmp_path / "m"), *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("important")
    result = thinktime("train", "sft", "--data", str(data), "-o", str(victim), "--max-steps", "1")
    assert result.returncode == 2 and "holds other files" in result.stderr
    assert (victim / "notes.txt").read_text() == "important"
    empty = tmp_path / "pairs.jsonl"
    empty.write_text("")
    result = thinktime("train", "dpo", "--data", str(empty), "-o", str(tmp_path / "n"))
    assert result.returncode == 2 and "no rows to train on" in result.stderr


def test_a_refused_bootstrap_leaves_no_settings_behind(tmp_path):
    """A run stopped by bad settings writes no config.json: the corrected command then starts, not 'other settings'."""
    result = thinktime("bootstrap", "--train-problems", "0", "--model", "smollm2-135m", "-o", str(tmp_path / "b"))
    assert result.returncode == 2 and not (tmp_path / "b" / "config.json").exists()


def test_bootstrap_trains_on_a_train_split_where_the_dataset_has_one():
    from thinktime.bootstrap.loop import training_split

    assert training_split("gsm8k") == "train"  # its test split is what `thinktime eval -d gsm8k` measures
    assert training_split("arith:2") is None and training_split("math500") is None
