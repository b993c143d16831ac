"""`thinktime label`: Monte Carlo step labels from the embedded model's own rollouts, their run folder (resumed
after SIGKILL), label noise between two labellings, and a scorer's step-level F1 against them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from kill_resume import kill_after_first_line, resume
from typer.testing import CliRunner

from thinktime import Thinker
from thinktime.cli import app
from thinktime.errors import BadInputError
from thinktime.evaluation.splits import split_problems
from thinktime.labels.agreement import compare_labels, first_wrong
from thinktime.evaluation.splits import select_problems
from thinktime.labels.chains import chains_from_folder
from thinktime.labels.f1 import evaluate_scorer, processbench_f1
from thinktime.labels.run import LabelSettings, build_config, run_labels
from thinktime.labels.store import LABELS, LabelStore, read_labels, row_problem

ROOT = Path(__file__).resolve().parent.parent
THINKTIME = str(Path(sys.executable).parent / "thinktime")  # the console script, as users run it


def label(thinker, folder, settings, **work) -> list[dict]:
    source = {"dataset": "arith:1"} if "problems" in work else {"from": "test"}
    with LabelStore(folder, build_config(thinker, settings, source)) as store:
        run_labels(thinker, store, settings, **work)
        return list(store.records)


@pytest.fixture(scope="module")
def labelled(engine, tmp_path_factory):
    """Two training problems of arith:1, 2 chains each, K = 2 rollouts from every step prefix; then the same
    chains labelled again by binary search with another seed."""
    base = tmp_path_factory.mktemp("labels")
    thinker = Thinker(engine=engine, max_new_tokens=24, temperature=0.7)
    _, problems = select_problems("arith:1", "train", 4, 2, 0)
    mc = label(thinker, base / "mc", LabelSettings(chains=2, rollouts=2), problems=problems[:2])
    chains, _ = chains_from_folder(base / "mc")
    binary = label(thinker, base / "binary", LabelSettings(rollouts=2, search="binary", seed=1), chains=chains)
    return {"problems": problems[:2], "mc": mc, "binary": binary, "base": base}


def test_labels_have_the_stepwise_format_and_soft_and_hard_agree(labelled):
    rows = labelled["mc"]
    assert read_labels(labelled["base"] / "mc") == rows
    assert [(r["id"], r["chain"]) for r in rows] == [(p.id, i) for p in labelled["problems"] for i in (0, 1)]
    for row in rows:
        assert row_problem(row) is None
        problem = next(p for p in labelled["problems"] if p.id == row["id"])
        assert row["prompt"] == problem.question and row["gold"] == problem.gold
        assert row["rollouts"] == 2 and row["search"] == "mc" and row["tokens"] > 0
        assert row["labels"] == [s > 0 for s in row["soft_labels"]]  # hard: any rollout reached the gold
        for soft, measured in zip(row["soft_labels"], row["measured"]):
            assert soft in ((0.0, 0.5, 1.0) if measured else (0.0, 1.0))  # a share of K = 2, or the chain's own
        if row["finish"] == "stop" and row["completions"]:  # the last step: the chain's own graded answer
            assert not row["measured"][-1] and row["labels"][-1] == row["correct"]
        assert all(row["measured"][:-1])


def test_labels_come_from_training_problems_only(labelled):
    heldout = {p.id for p in split_problems(_Split())[1].problems}
    assert not heldout & {r["id"] for r in labelled["mc"]}


class _Split:
    dataset, train_problems, eval_problems, data_seed = "arith:1", 4, 2, 0


def test_binary_search_labels_are_monotone_and_cost_fewer_rollouts(labelled):
    by_key = {(r["id"], tuple(r["completions"])): r for r in labelled["mc"]}
    for row in labelled["binary"]:
        assert row["search"] == "binary" and row_problem(row) is None
        assert (row["id"], tuple(row["completions"])) in by_key  # the same chains
        wrong = first_wrong(row["labels"])
        assert row["labels"] == [wrong < 0 or i < wrong for i in range(len(row["labels"]))]
        assert row["labels"] == [s > 0 for s in row["soft_labels"]]
        assert sum(row["measured"]) <= sum(by_key[(row["id"], tuple(row["completions"]))]["measured"])
    figures = compare_labels(labelled["mc"], labelled["binary"])
    assert figures["chains"] == len(labelled["mc"]) and figures["only_a"] == figures["only_b"] == 0
    assert figures["steps"] == sum(len(r["labels"]) for r in labelled["mc"])


def test_a_second_run_of_the_same_folder_adds_nothing_and_another_configuration_is_refused(engine, labelled):
    thinker = Thinker(engine=engine, max_new_tokens=24, temperature=0.7)
    folder = labelled["base"] / "mc"
    before = (folder / LABELS).read_bytes()
    assert label(thinker, folder, LabelSettings(chains=2, rollouts=2), problems=labelled["problems"])
    assert (folder / LABELS).read_bytes() == before
    with pytest.raises(BadInputError, match="different configuration.*rollouts: 2 -> 3"):
        label(thinker, folder, LabelSettings(chains=2, rollouts=3), problems=labelled["problems"])


def test_a_budget_stops_between_batches(engine, tmp_path):
    thinker = Thinker(engine=engine, max_new_tokens=8, temperature=0.7)
    _, problems = select_problems("arith:1", "train", 4, 2, 0)
    settings = LabelSettings(chains=1, rollouts=2, batch_problems=1, budget=1)
    with LabelStore(tmp_path, build_config(thinker, settings, {"dataset": "arith:1"})) as store:
        assert run_labels(thinker, store, settings, problems=problems[:3]) == "budget"
        assert [r["id"] for r in store.records] == [problems[0].id]  # one batch, then the budget was spent


def test_agreement_of_two_hand_made_labellings():
    a = [{"id": "p", "completions": ["x", "y"], "labels": [True, False], "soft_labels": [0.5, 0.0]},
         {"id": "q", "completions": ["z"], "labels": [True], "soft_labels": [1.0]}]
    b = [{"id": "p", "completions": ["x", "y"], "labels": [True, True], "soft_labels": [0.25, 0.5]},
         {"id": "r", "completions": ["z"], "labels": [True], "soft_labels": [1.0]}]
    figures = compare_labels(a, b)
    assert (figures["chains"], figures["only_a"], figures["only_b"], figures["steps"]) == (1, 1, 1, 2)
    assert figures["hard_agreement"] == 0.5 and figures["first_wrong_agreement"] == 0.0
    assert figures["soft_mean_abs_diff"] == pytest.approx(0.375)


def test_processbench_f1_is_the_harmonic_mean_of_the_two_accuracies():
    # references: two erroneous chains (first wrong at 1 and 0) and two correct ones
    figures = processbench_f1([1, 0, -1, -1], [1, 2, -1, 0])
    assert figures["erroneous_accuracy"] == 0.5 and figures["correct_accuracy"] == 0.5
    assert figures["f1"] == pytest.approx(0.5)
    assert processbench_f1([-1], [-1])["f1"] is None  # no erroneous chain: no F1 to give


HAND_MADE = [
    {"id": "a", "prompt": "What is 2 + 3?", "completions": ["2 + 3 = 5.", "The answer is \\boxed{5}."],
     "labels": [True, True], "soft_labels": [1.0, 1.0], "gold": "5"},
    {"id": "a", "prompt": "What is 2 + 3?", "completions": ["2 + 3 = 6.", "The answer is \\boxed{6}."],
     "labels": [False, False], "soft_labels": [0.0, 0.0], "gold": "5"},
    {"id": "b", "prompt": "What is 4 + 4?", "completions": ["4 + 4 = 8.", "So 8 - 1 = 7: \\boxed{7}."],
     "labels": [True, False], "soft_labels": [1.0, 0.0], "gold": "8"},
]


def test_step_f1_of_the_model_judging_itself_on_a_hand_made_labels_file(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HAND_MADE))
    result = CliRunner().invoke(app, ["label-f1", "--labels", str(path), "--scorer", "self", "--judge-tokens", "24",
                                      "--json", "--model", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["references"] == [-1, 0, 1]
    assert all(-1 <= p < 2 for p in figures["predictions"])
    again = processbench_f1(figures["references"], figures["predictions"])
    assert (figures["erroneous"], figures["correct"], figures["f1"]) == (2, 1, again["f1"])


def test_a_per_step_scorer_scores_each_chain_once():
    from thinktime.scorers.base import Scorer

    class Rule(Scorer):  # stands in for a PRM: a step that writes 6 or 7 scores low
        calls = 0

        def score(self, question, chains):
            Rule.calls += 1
            return [[0.2 if "6" in s or "7" in s else 0.9 for s in steps] for steps in chains]

    figures = evaluate_scorer(HAND_MADE, lambda question: Rule(), threshold=0.5)
    assert Rule.calls == 2  # one call per question, every chain of it scored at once
    assert figures["predictions"] == figures["references"] == [-1, 0, 1] and figures["f1"] == 1.0
    strict = evaluate_scorer(HAND_MADE, lambda question: Rule(), threshold=0.95)  # every first step "wrong"
    assert strict["predictions"] == [0, 0, 0]
    assert (strict["erroneous_accuracy"], strict["correct_accuracy"], strict["f1"]) == (0.5, 0.0, 0.0)


def test_bad_input_is_named(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["label", "-d", "nope", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown dataset 'nope'" in result.output
    result = runner.invoke(app, ["label", "-d", "arith:1", "-K", "0", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--rollouts must be at least 1" in result.output
    result = runner.invoke(app, ["label", "--from", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a folder" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(HAND_MADE[0]) + "\n" + json.dumps({**HAND_MADE[1], "labels": [True]}) + "\n")
    result = runner.invoke(app, ["label-f1", "--labels", str(bad), "--scorer", "self"])
    assert result.exit_code == 2 and "bad.jsonl line 2 is malformed (2 steps but 1 labels)" in result.output
    result = runner.invoke(app, ["label-f1", "--labels", str(tmp_path / "nothing"), "--scorer", "self"])
    assert result.exit_code == 2 and "no step labels" in result.output
    assert not (tmp_path / "x").exists()  # refused before any folder was made


def _label_command(folder: Path) -> list[str]:
    return [THINKTIME, "label", "-d", "arith:2", "--limit", "3", "-c", "2", "-K", "2", "--batch-problems", "1",
            "--max-new-tokens", "12", "--model", "smollm2-135m", "--output", str(folder)]


def test_a_killed_labelling_resumes_without_loss_or_duplicates(tmp_path):
    folder = tmp_path / "run"
    labels = folder / LABELS
    kept = kill_after_first_line(_label_command(folder), labels, torn=b'{"id": "arith-L2-0002", "chain": 1, "prom')
    done_before = kept.count(b"\n")
    assert 1 <= done_before < 6
    resumed = resume(_label_command(folder))
    assert f"resuming, {done_before}/6 chains done" in resumed.stderr
    after = labels.read_bytes()
    assert after.startswith(kept)  # nothing written before the kill was redone or rewritten
    keys = [(r["id"], r["chain"]) for r in map(json.loads, after.decode().splitlines())]
    assert sorted(keys) == [(f"arith-L2-{i:04d}", c) for i in range(3) for c in (0, 1)]  # no loss, no duplicates


class _Table:
    """Stands in for the rollouts: a prefix's share of rollouts reaching the gold, from a hand-made table."""

    def __init__(self, shares: dict[int, float]):
        self.shares_by_depth, self.asked = shares, []

    def shares(self, probes):
        self.asked += [depth for _, _, depth in probes]
        return [(self.shares_by_depth[depth], 10) for _, _, depth in probes]


def _chain(text: str, finish: str, gold: str = "85"):
    from thinktime.evaluation.datasets import Problem
    from thinktime.labels.chains import Chain

    return Chain(Problem("p", "What is 38 + 47?", gold), 0, text, finish)


def test_binary_search_measures_few_prefixes_and_infers_the_rest():
    from thinktime.labels.montecarlo import (
        label_by_binary_search,
        label_every_step,
        start,
    )

    steps = [f"step {i}" for i in range(1, 9)] + ["So \\boxed{84}."]  # nine steps, ending wrong
    shares = {1: 1.0, 2: 0.75, 3: 0.5, 4: 0.25, 5: 0.0, 6: 0.25, 7: 0.0, 8: 0.0}
    item, table = start(_chain("\n\n".join(steps), "stop"), "\n\n"), _Table(shares)
    label_by_binary_search([item], table)
    assert table.asked == [5, 3, 4] and item.tokens == 30  # log2 of the prefixes, the known last one not among them
    assert item.measured == [d in (3, 4, 5) for d in range(1, 10)]
    assert [s > 0 for s in item.soft] == [True] * 4 + [False] * 5  # inferred: right before step 5, wrong from it
    assert item.soft[:6] == [1.0, 1.0, 0.5, 0.25, 0.0, 0.0]  # step 6 (0.25 if measured) is inferred wrong

    every, table = start(_chain("\n\n".join(steps), "stop"), "\n\n"), _Table(shares)
    label_every_step([every], table)
    assert table.asked == list(range(1, 9)) and every.soft == [*shares.values(), 0.0]  # the last: its own answer

    right, table = start(_chain("38 + 47 = 85.\n\nSo \\boxed{85}.", "stop"), "\n\n"), _Table({})
    label_by_binary_search([right], table)
    assert table.asked == [] and right.soft == [1.0, 1.0]  # a right chain: no wrong step, nothing to measure
    one, table = start(_chain("So \\boxed{84}.", "stop"), "\n\n"), _Table({})
    label_by_binary_search([one], table)
    assert table.asked == [] and one.soft == [0.0]
    cut, table = start(_chain("38 + 47 =\n\n85 so far", "length"), "\n\n"), _Table({1: 0.5, 2: 0.25})
    label_by_binary_search([cut], table)
    assert table.asked == [2] and cut.soft == [1.0, 0.25]  # a cut chain: its last prefix is measured too
