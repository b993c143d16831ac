"""End to end: the embedded model evaluated on `arith`, a run killed with SIGKILL and resumed, reports and plots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from kill_resume import ENV, kill_after_first_line, resume
from typer.testing import CliRunner

from thinktime import Thinker
from thinktime.cli import app
from thinktime.evaluation.datasets import load_dataset
from thinktime.evaluation.report import PLOT, budget_table, summarize, write_report
from thinktime.evaluation.runner import Settings, build_config, run_eval
from thinktime.evaluation.store import RECORDS, RunStore, read_config, read_records

ROOT = Path(__file__).resolve().parent.parent


def evaluate(thinker, dataset, settings, folder):
    config = build_config(thinker, dataset, settings)
    seen = []
    with RunStore(folder, config) as store:
        records = run_eval(thinker, dataset, store, settings, on_record=seen.append)
    return records, seen


@pytest.fixture(scope="module")
def runs(engine, tmp_path_factory):
    """Two real runs of the embedded model on three level-1 problems: greedy cot, and sampled n = 1,2."""
    base = tmp_path_factory.mktemp("runs")
    data = load_dataset("arith:1", limit=3)
    cot = Thinker(engine=engine, max_new_tokens=48)
    sampled = Thinker(engine=engine, max_new_tokens=24, temperature=0.7)
    return {
        "data": data,
        "cot": (base / "cot", *evaluate(cot, data, Settings("cot", [1]), base / "cot")),
        "sc": (base / "sc", *evaluate(sampled, data, Settings("self-consistency", [1, 2], seed=3), base / "sc")),
    }


def test_a_complete_eval_writes_one_graded_record_per_problem(runs):
    folder, records, seen = runs["cot"]
    assert [r["id"] for r in records] == [p.id for p in runs["data"].problems]
    assert [r["id"] for r in seen] == [r["id"] for r in records]  # each reported as it finished
    assert read_records(folder) == records  # and on disk
    for record, problem in zip(records, runs["data"].problems):
        assert record["gold"] == problem.gold and record["question"] == problem.question
        (candidate,) = record["candidates"]
        assert 0 < candidate["tokens"] <= 48 and candidate["finish"] in ("stop", "length")
        assert candidate["text"]
        assert record["chosen"] == candidate["answer"]
        assert record["correct"] == candidate["correct"]
        assert record["by_k"]["1"]["tokens"] == candidate["tokens"] == record["completion_tokens"]
        assert record["seconds"] > 0 and record["prompt_tokens"] > 0
    assert json.loads((folder / "config.json").read_text())["config"]["max_new_tokens"] == 48


def test_smaller_n_come_from_the_same_samples(runs):
    _, records, _ = runs["sc"]
    for record in records:
        candidates = record["candidates"]
        assert len(candidates) == 2
        one, two = record["by_k"]["1"], record["by_k"]["2"]
        assert one["answer"] == candidates[0]["answer"]  # maj@1 is the first sample
        assert one["tokens"] == candidates[0]["tokens"]
        assert two["tokens"] == candidates[0]["tokens"] + candidates[1]["tokens"]
        assert two["answer"] in (candidates[0]["answer"], candidates[1]["answer"])
        assert record["chosen"] == two["answer"]
    summary = summarize(runs["sc"][0])
    assert [p.label for p in summary.points] == ["sample@1", "maj@2"]
    assert all(0.0 <= p.pass_at_k <= 1.0 for p in summary.points)
    assert summary.points[1].pass_at_k >= summary.points[0].pass_at_k


def test_a_problems_samples_do_not_depend_on_the_run_around_it(fp32_engine, tmp_path):
    # Each problem draws from its own seed: a run extended from --limit 2 to 4, a fresh run of 4, and
    # one problem per call all sample the same chains (fp32: batching does not move the logits).
    thinker = Thinker(engine=fp32_engine, max_new_tokens=12, temperature=0.8)

    def texts(folder):
        return {r["id"]: [c["text"] for c in r["candidates"]] for r in read_records(folder)}

    settings = Settings("self-consistency", [1, 2], seed=5)
    evaluate(thinker, load_dataset("arith:1", limit=2), settings, tmp_path / "grown")
    evaluate(thinker, load_dataset("arith:1", limit=4), settings, tmp_path / "grown")  # resumed: 2 more
    evaluate(thinker, load_dataset("arith:1", limit=4), settings, tmp_path / "fresh")
    evaluate(thinker, load_dataset("arith:1", limit=4), Settings("self-consistency", [1, 2], seed=5,
                                                                  batch_problems=1), tmp_path / "alone")
    assert texts(tmp_path / "grown") == texts(tmp_path / "fresh") == texts(tmp_path / "alone")
    assert len(texts(tmp_path / "fresh")) == 4


def test_a_registry_strategy_runs_once_per_n(engine, tmp_path):
    data = load_dataset("arith:1", limit=1)
    thinker = Thinker(engine=engine, max_new_tokens=32)
    settings = Settings("budget", [8, 16], options={"answer_tokens": 6})
    (record,), _ = evaluate(thinker, data, settings, tmp_path)
    assert set(record["by_k"]) == {"8", "16"}
    for k, point in record["by_k"].items():
        assert 0 < point["tokens"] <= int(k) + 6
    assert [p.label for p in summarize(tmp_path).points] == ["budget max_tokens=8", "budget max_tokens=16"]


def test_report_table_markdown_and_plot(runs, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(runs["cot"][0]), str(runs["sc"][0]), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy against thinking tokens" in result.output and "maj@2" in result.output
    markdown = (out / "report.md").read_text()
    for expected in ("| cot ·", "maj@2", "sample@1", "[95% CI]", "At equal token budgets", "pass@k",
                     "Grader disagreements", PLOT):
        assert expected in markdown
    png = out / PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def _synthetic_run(folder, tokens: int, correct: bool, ids=("p1",), answer="7", **config):
    """A run folder holding graded records (the report is under test, not the run that made them)."""
    config = {"model": "m", "dataset": "d", "strategy": "cot", "n": [1], **config}
    with RunStore(folder, config) as store:
        for problem in ids:
            candidate = {"answer": answer, "tokens": tokens, "correct": correct, "simple": correct}
            store.append({"id": problem, "gold": "7", "candidates": [candidate], "chosen": answer, "correct": correct,
                          "simple": correct, "completion_tokens": tokens, "seconds": 0.1,
                          "by_k": {"1": {"answer": answer, "correct": correct, "simple": correct, "tokens": tokens}}})
    return folder


def test_comparing_runs_at_equal_budgets_names_and_problem_sets(tmp_path):
    # 23.25 tokens rounds down to 23.2: its own point must still count within "23.2"
    a = _synthetic_run(tmp_path / "one", 23, True, ids=("p1", "p2"))
    b = _synthetic_run(tmp_path / "two", 24, False, ids=("p1", "p2", "p3"))
    summaries = [summarize(a), summarize(b)]
    summaries[0].points[0].avg_tokens = 23.25
    budgets, best = budget_table(summaries)
    assert best[0][budgets.index(23.25)] == 1.0
    summaries, md, _ = write_report([a, b], tmp_path / "report")
    assert [s.name for s in summaries] == ["cot · m · d · greedy · one", "cot · m · d · greedy · two"]
    assert "cover different problems (2, 3)" in md.read_text()


def test_a_multi_line_answer_stays_in_its_table_row(tmp_path):
    folder = _synthetic_run(tmp_path / "run", 5, False, answer="\\begin{pmatrix}1\\\\\n2\\end{pmatrix}")
    with RunStore(folder, read_config(folder)["config"]) as store:
        record = dict(store.records[0])
    record["candidates"][0]["simple"] = True  # a disagreement, so the answer is listed
    (folder / RECORDS).write_text(json.dumps(record) + "\n")
    _, md, _ = write_report([folder])
    rows = [line for line in md.read_text().splitlines() if "pmatrix" in line]
    assert len(rows) == 1 and rows[0].startswith("| ") and rows[0].endswith(" |")


def test_grader_disagreements_are_listed(tmp_path):
    config = {"model": "m", "dataset": "d", "strategy": "cot", "n": [1]}
    with RunStore(tmp_path, config) as store:
        candidate = {"answer": "\\frac{\\sqrt{3}}{2}", "tokens": 5, "correct": True, "simple": False}
        store.append({"id": "p1", "gold": "\\frac{\\sqrt3}{2}", "candidates": [candidate], "chosen": candidate["answer"],
                      "correct": True, "simple": False, "completion_tokens": 5, "seconds": 0.1,
                      "by_k": {"1": {"answer": candidate["answer"], "correct": True, "simple": False, "tokens": 5}}})
    summaries, md, png = write_report([tmp_path])
    assert len(summaries[0].disagreements) == 1
    assert "`\\frac{\\sqrt{3}}{2}`" in md.read_text() and png.is_file()


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a thinktime run" in result.output


def test_damaged_run_files_are_named_not_crashed_on(runs, tmp_path):
    """A run folder whose config.json or records hold something else: the file and line are named, exit 2."""
    import shutil

    source = runs["cot"][0]
    for name, damage, message in [
            ("config.json", "not json", "config.json is damaged"),
            ("records.jsonl", "[1, 2]\n", "line 1 is damaged (not a JSON object)"),
            ("records.jsonl", '{"id": "x"}\n', "line 1 is damaged (no gold, by_k)"),
            ("records.jsonl", "", "has no finished problems yet")]:
        folder = tmp_path / f"run-{name}-{len(damage)}"
        shutil.copytree(source, folder)
        (folder / name).write_text(damage, encoding="utf-8")
        result = CliRunner().invoke(app, ["report", str(folder)])
        assert result.exit_code == 2 and message in result.output, (name, damage, result.output)


def test_an_empty_dataset_and_an_unusable_output_folder_are_bad_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "-d", str(empty), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "holds no problems" in result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "-d", "arith:1", "--limit", "1", "--max-new-tokens", "4",
                                      "--output", str(blocker / "run")])
    assert result.exit_code == 2 and "check the path" in result.output, result.output


def test_eval_of_the_problems_training_holds_out(tmp_path):
    from thinktime.evaluation.splits import select_problems

    result = CliRunner().invoke(app, ["eval", "-d", "arith:2", "--problems", "heldout", "--train-problems", "6",
                                      "--eval-problems", "4", "--limit", "2", "--max-new-tokens", "4", "--engine",
                                      "llamacpp", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    _, held = select_problems("arith:2", "heldout", 6, 4, 0)
    assert [r["id"] for r in read_records(tmp_path / "run")] == [p.id for p in held[:2]]
    assert read_config(tmp_path / "run")["config"]["dataset"] == "arith:2-heldout"
    result = CliRunner().invoke(app, ["eval", "-d", "arith:2", "--problems", "heldout", "--train-problems", "6",
                                      "--eval-problems", "4", "--limit", "3", "--max-new-tokens", "4", "--engine",
                                      "llamacpp", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output  # a larger --limit extends the same run
    assert [r["id"] for r in read_records(tmp_path / "run")] == [p.id for p in held[:3]]
    result = CliRunner().invoke(app, ["eval", "-d", "arith:2", "--problems", "test", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "use all (the default), heldout or train" in result.output


def _eval_command(folder: Path, max_new_tokens: int = 8) -> list[str]:
    # the console script, as users run it (`python -m thinktime.cli` would build a second app without area commands)
    return [str(Path(sys.executable).parent / "thinktime"), "eval", "-d", "arith:2", "--limit", "5", "--batch-problems", "1",
            "--max-new-tokens", str(max_new_tokens), "--output", str(folder)]


def test_a_killed_eval_resumes_without_loss_or_duplicates(tmp_path):
    folder = tmp_path / "run"
    records = folder / RECORDS
    kept = kill_after_first_line(_eval_command(folder), records)
    done_before = kept.count(b"\n")
    assert 1 <= done_before < 5

    resumed = resume(_eval_command(folder))
    assert f"resuming, {done_before}/5 done" in resumed.stderr
    after = records.read_bytes()
    assert after.startswith(kept)  # nothing recorded before the kill was redone or rewritten
    ids = [json.loads(line)["id"] for line in after.decode().splitlines()]
    assert ids == [f"arith-L2-{i:04d}" for i in range(5)]  # no loss, no duplicates, in order
    assert "report:" in resumed.stdout and (folder / PLOT).is_file()

    again = subprocess.run(_eval_command(folder), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and records.read_bytes() == after  # a finished run redoes nothing

    changed = subprocess.run(_eval_command(folder, max_new_tokens=9), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2
    assert "different configuration" in changed.stderr and "max_new_tokens: 8 -> 9" in changed.stderr
    assert records.read_bytes() == after


def test_options_of_the_n_list_strategies_are_checked_by_the_registry():
    from thinktime.errors import BadInputError
    from thinktime.evaluation.runner import check_settings

    with pytest.raises(BadInputError, match="has no option 'rounds'"):
        check_settings(Settings("self-consistency", [1, 2], options={"rounds": 1}), temperature=0.7)
    with pytest.raises(BadInputError, match="has no option"):
        check_settings(Settings("cot", [1], options={"n": 2}), temperature=0.0)
