"""The `thinktime` command end to end, through a subprocess, on the embedded model."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

THINKTIME = [sys.executable, "-m", "thinktime"]
FAST = ["--max-new-tokens", "24"]


def run(*args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 300):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*THINKTIME, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def test_solve_json_prints_one_object_per_question(tmp_path):
    proc = run("solve", "--json", *FAST, "What is 2+3?", "5的十次方等于多少?")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["question"] for r in lines] == ["What is 2+3?", "5的十次方等于多少?"]
    for r in lines:
        assert {"answer", "reasoning", "finish_reason", "usage", "seconds"} <= r.keys()
        assert r["finish_reason"] in ("stop", "length")
        assert 0 < r["usage"]["completion_tokens"] <= 24
        assert r["usage"]["prompt_tokens"] > 100  # the thinking system prompt went in
        assert r["model"] == "smollm2-135m"
    # The Chinese question got the Chinese thinking prompt: more prompt tokens for this tokenizer.
    assert lines[1]["usage"]["prompt_tokens"] != lines[0]["usage"]["prompt_tokens"]


def test_batch_from_a_text_file_and_a_jsonl_file_and_stdin(tmp_path):
    text_file = tmp_path / "q.txt"
    text_file.write_text("What is 1+1?\n\nWhat is 2+2?\n", encoding="utf-8")
    jsonl_file = tmp_path / "q.jsonl"
    jsonl_file.write_text('{"question": "What is 3+3?"}\n{"problem": "What is 4+4?"}\n', encoding="utf-8")
    for args, stdin, expected in (
        (["--file", str(text_file)], None, ["What is 1+1?", "What is 2+2?"]),
        (["--file", str(jsonl_file)], None, ["What is 3+3?", "What is 4+4?"]),
        ([], "What is 5+5?\n", ["What is 5+5?"]),
    ):
        proc = run("solve", "--json", "--no-think", *FAST, *args, stdin=stdin)
        assert proc.returncode == 0, proc.stderr
        assert [json.loads(line)["question"] for line in proc.stdout.splitlines()] == expected


def test_streaming_solve_prints_reasoning_then_the_answer_panel():
    proc = run("solve", *FAST, "What is 6 times 7?")
    assert proc.returncode == 0, proc.stderr
    assert "Answer (" in proc.stdout
    assert "finish:" in proc.stderr and "completion tokens" in proc.stderr


def test_a_multi_chain_strategy_shows_the_chosen_chain_and_its_scores():
    # self-consistency and best-of-n stream votes / scores, not text: the chosen chain is printed once chosen
    for strategy, extra in (("self-consistency", []), ("best-of-n", ["-o", "judge_tokens=8"])):
        args = [*FAST, "-s", strategy, "-n", "2", "--seed", "1", *extra, "What is 6 times 7?"]
        chosen = json.loads(run("solve", "--json", *args).stdout)["text"]
        proc = run("solve", *args)
        assert proc.returncode == 0, proc.stderr
        assert chosen.strip() and chosen.strip()[:40] in proc.stdout and "Answer (" in proc.stdout
        assert "the chosen chain" in proc.stderr
        assert strategy != "best-of-n" or "scores:" in proc.stderr


@pytest.mark.parametrize("args, stdin, code, message", [
    (["solve", "   "], None, 2, "question 1 is empty"),
    (["solve"], "", 2, "no question given"),
    (["solve", "--file", "/nonexistent/q.txt"], None, 2, "question file not found"),
    (["solve", "--model", "no-such-model", "hi"], None, 3, "unknown model 'no-such-model'"),
    (["solve", "--model", "internlm3-8b-instruct", "hi"], None, 5, "no CUDA GPU is visible"),
    (["solve", "--strategy", "nonsense", "hi"], None, 2, "unknown strategy"),
    (["download", "internlm3-8b-instruct"], None, 4, "--source modelscope"),
    (["solve", "--max-new-tokens", "0", "hi"], None, 2, "max_new_tokens must be a whole number of at least 1"),
    (["solve", "--budget-tokens", "-3", "hi"], None, 2, "budget_tokens must be a whole number of at least 1"),
    (["solve", "--device", "tpu", "hi"], None, 2, "unknown device 'tpu'"),
    (["solve", "-s", "budget-forcing", "-n", "2", "hi"], None, 2, "unknown strategy 'budget-forcing'"),
    (["solve", "--file", "/"], None, 2, "question file a folder, not a file"),
    (["solve", "--file", "q[red].txt"], None, 2, "question file not found: q[red].txt"),  # printed, not markup
    (["solve", "-m", "./nope", "hi"], None, 3, "unknown model './nope'"),  # a path, never a hub repo id
    pytest.param(["solve", "--engine", "vllm", "hi"], None, 6, 'pip install "thinktime[vllm]"',
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")),
])
def test_errors_are_clear_and_exit_with_documented_codes(args, stdin, code, message):
    proc = run(*args, stdin=stdin)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_question_file_that_is_not_utf8_is_named(tmp_path):
    binary = tmp_path / "q.txt"
    binary.write_bytes(b"\xff\xfe what\n")
    proc = run("solve", "--file", str(binary))
    assert proc.returncode == 2 and "is not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_jsonl_line_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{"question": "cut off\n', encoding="utf-8")
    proc = run("solve", "--file", str(bad))
    assert proc.returncode == 2
    assert "line 2 is not valid JSON" in proc.stderr


def test_models_lists_aliases_and_presence():
    proc = run("models")
    assert proc.returncode == 0
    assert "internlm3-8b-instruct" in proc.stdout and "smollm2-135m" in proc.stdout


def test_chat_keeps_history_across_turns():
    proc = run("chat", "--no-think", *FAST, stdin="My name is Ada.\nWhat is my name?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Answer (") == 2


def test_ctrl_c_stops_generation_cleanly_with_exit_code_130():
    import signal
    import time

    proc = subprocess.Popen([*THINKTIME, "solve", "--max-new-tokens", "1000", "--temperature", "1.0",
                             "--seed", "3", "Tell me a very long story about numbers."],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            # as from a terminal: a suite started in the background (`cmd &`) runs with
                            # SIGINT ignored, which children inherit and Python then leaves ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(1)  # the reasoning has started streaming
    assert first
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert "Traceback" not in stderr


def test_vote_table_shows_answers_with_brackets():
    """Interval answers such as [a, b] (common in MATH-500) are text, not rich markup."""
    from rich.console import Console

    from thinktime.cli_views import vote_table

    console = Console(record=True, width=80)
    console.print(vote_table([{"answer": "[a, b]", "votes": 2}, {"answer": "[red]", "votes": 1}], samples=3, n=3))
    text = console.export_text()
    assert "[a, b]" in text and "[red]" in text


def test_questions_with_a_bom_or_a_leading_brace_are_read_as_written(tmp_path):
    from thinktime.cli import read_questions

    text = tmp_path / "q.txt"
    text.write_text("\ufeff{1,2,3} has how many elements?\nWhat is 2+2?\n", encoding="utf-8")
    assert read_questions([], text) == ["{1,2,3} has how many elements?", "What is 2+2?"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('\ufeff{"question": "What is 1+1?"}\n', encoding="utf-8")
    assert read_questions([], jsonl) == ["What is 1+1?"]


def test_text_options_stay_text_and_numbers_become_numbers():
    from thinktime.cli import strategy_options

    assert strategy_options("budget", None, None, ["wait=2", "min_tokens=30"]) == {"wait": "2", "min_tokens": 30}
    assert strategy_options("beam", None, None, ["delimiter=1", "width=3"]) == {"delimiter": "1", "width": 3}


def test_answers_and_progress_print_as_text():
    # ":100:" is not an emoji code here, and best-of-n's progress (an index, not a branch) shows its scores
    from rich.console import Console

    from thinktime.cli import _print_answer, err, out
    from thinktime.cli_views import StrategyView
    from thinktime.types import Event, Result, Usage

    result = Result("q", "1:100:1000", "boxed", "", "\\boxed{1:100:1000}", "\\boxed{1:100:1000}", "stop",
                    Usage(1, 2), 0.1, "cot", "m")
    with out.capture() as shown, err.capture():
        _print_answer(result)
    assert "1:100:1000" in shown.get()
    console = Console(record=True, width=100, emoji=False, force_terminal=False)
    view = StrategyView(console)
    view.show(Event("progress", data={"votes": [{"answer": "4", "votes": 2}], "samples": 2, "n": 2}))
    view.show(Event("progress", data={"scores": [0.1, 0.9], "best": 1}))
    view.close()
    console.print("after")
    text = console.export_text()
    assert "chain 2" in text and "\nafter" in text  # the live table's last line is ended off a terminal


def test_strategies_lists_every_strategy_with_its_options():
    from typer.testing import CliRunner

    from thinktime.cli import app
    from thinktime.strategies import STRATEGY_OPTIONS

    result = CliRunner().invoke(app, ["strategies"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name, options in STRATEGY_OPTIONS.items():
        assert name in result.output
        for key in options:
            assert key in result.output
    assert "self-consistency" in CliRunner().invoke(app, ["solve", "--help"], env={"COLUMNS": "200"}).output


def test_allocate_tokens_spends_one_budget_over_the_questions(tmp_path):
    from typer.testing import CliRunner

    from thinktime.cli import app

    questions = tmp_path / "q.txt"
    questions.write_text("What is 1 + 1?\nWhat is 2 + 5?\n")
    result = CliRunner().invoke(app, ["solve", "--file", str(questions), "--allocate-tokens", "200", "-n", "4",
                                      "--no-think", "--max-new-tokens", "16", "--seed", "1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 and sum(r["usage"]["completion_tokens"] for r in rows) <= 200
    assert all(r["strategy"] == "self-consistency" and 1 <= r["details"]["samples"] <= 4 for r in rows)
    bad = CliRunner().invoke(app, ["solve", "x", "--allocate-tokens", "100", "-s", "beam"])
    assert bad.exit_code == 2
