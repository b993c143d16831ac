"""`thinktime tree-pairs`: MCTS on the embedded model with rollouts graded against the gold answer, step
preference pairs and SFT rows drawn from its trees, the run folder (resumed after SIGKILL, other settings
refused), the token budget, and the pair rules on a hand-made tree."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from kill_resume import kill_after_first_line, resume

from thinktime import Thinker
from thinktime.errors import BadInputError
from thinktime.evaluation.datasets import load_dataset
from thinktime.evaluation.grading import grade
from thinktime.strategies.base import to_candidate
from thinktime.treesearch.pairs import (
    PairFilter,
    best_chains,
    similarity,
    step_pairs,
    steps_to,
)
from thinktime.treesearch.rollout import chain_text
from thinktime.treesearch.run import TREES, TreeRun, tree_run
from thinktime.treesearch.search import TreeSettings
from thinktime.types import Completion

ROOT = Path(__file__).resolve().parent.parent
RUN = TreeRun(dataset="arith:1", split=None, search=TreeSettings(iterations=3, expansions=2, depth=4, step_tokens=16,
                                                                  rollout_tokens=40, temperature=0.8),
              rules=PairFilter(margin=0.5), keep=2)


@pytest.fixture(scope="module")
def searched(engine, tmp_path_factory):
    """One arith:1 problem searched: 3 iterations of 2 expansions, one rollout from each new node."""
    folder = tmp_path_factory.mktemp("trees")
    thinker = Thinker(engine=engine, max_new_tokens=40, think=False)
    problems = load_dataset("arith:1", limit=1).problems
    summary = tree_run(thinker, problems, folder, RUN)
    records = [json.loads(line) for line in (folder / TREES).read_text().splitlines()]
    return {"thinker": thinker, "problems": problems, "folder": folder, "summary": summary, "records": records}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_values_are_rollout_grades_backed_up_the_path(searched):
    (record,) = searched["records"]
    tree = record["tree"]
    assert len(tree) > 1 and record["completion_tokens"] > 0
    for node in tree[1:]:
        assert node["outcomes"] and node["visits"] >= 1 and 0.0 <= node["value"] <= 1.0  # Q = 2v - 1 in [-1, 1]
        for o in node["outcomes"]:  # graded as `thinktime eval` grades the whole chain
            text = chain_text(steps_to(tree, node), o["rollout"])
            answer = to_candidate(Completion(text, o["finish"], 0, 0)).answer
            assert (o["answer"], o["correct"]) == (answer, grade(answer, record["gold"]).correct)
        if node["finished"]:
            assert [o["rollout"] for o in node["outcomes"]] == [""]  # an ended chain is graded as it is, not continued
    kids = {n["id"]: [c for c in tree if c["parent"] == n["id"]] for n in tree}
    for node in tree[1:]:
        children = sum(c["visits"] for c in kids[node["id"]])
        assert node["visits"] >= 1 + children
        # backed up once from its own rollouts, then from each child's (a finished node is backed up again
        # each time it is selected, as is a node whose expansion gave no step)
        if node["visits"] == 1 + children:
            own = sum(o["correct"] for o in node["outcomes"]) / len(node["outcomes"])
            total = own + sum(c["value"] * c["visits"] for c in kids[node["id"]])
            assert node["value"] * node["visits"] == pytest.approx(total, abs=1e-3)


def test_pairs_share_their_prefix_and_keep_the_margin(searched):
    (record,) = searched["records"]
    tree, pairs = record["tree"], _rows(searched["folder"] / "pairs.jsonl")
    assert searched["summary"]["pairs"] == len(pairs)
    for pair in pairs:
        assert set(pair) == {"id", "prompt", "prefix", "chosen", "rejected", "chosen_value", "rejected_value"}
        assert pair["prompt"] == record["question"] and len(pair["chosen"]) == len(pair["rejected"]) == 1
        assert -1 <= pair["rejected_value"] <= pair["chosen_value"] - RUN.rules.margin <= 1
        chosen = next(n for n in tree if n["step"] == pair["chosen"][0] and steps_to(tree, n)[:-1] == pair["prefix"])
        rejected = next(n for n in tree if n["step"] == pair["rejected"][0] and n["parent"] == chosen["parent"])
        assert steps_to(tree, tree[chosen["parent"]]) == pair["prefix"]  # siblings: the same prefix
        assert similarity(chosen["step"], rejected["step"]) < RUN.rules.max_similarity


def test_sft_rows_are_correct_finished_chains_as_bootstrap_writes_them(searched):
    (record,) = searched["records"]
    rows = _rows(searched["folder"] / "sft.jsonl")
    assert len(rows) <= RUN.keep and searched["summary"]["sft_rows"] == len(rows)
    for row in rows:
        assert row["messages"][:-1] == searched["thinker"].messages(record["question"])
        text = row["messages"][-1]["content"]
        assert row["messages"][-1]["role"] == "assistant"
        assert grade(to_candidate(Completion(text, "stop", 0, 0)).answer, record["gold"]).correct


def test_a_rerun_searches_nothing_again_and_draws_pairs_with_new_filters(searched):
    strict = replace(RUN, rules=PairFilter(margin=2.0))
    seen = []
    summary = tree_run(searched["thinker"], searched["problems"], searched["folder"], strict, on_record=seen.append)
    assert seen == [] and summary["problems"] == 1
    for pair in _rows(searched["folder"] / "pairs.jsonl"):
        assert (pair["chosen_value"], pair["rejected_value"]) == (1.0, -1.0)
    tree_run(searched["thinker"], searched["problems"], searched["folder"], RUN)  # as the fixture left it


def test_another_configuration_and_a_changed_problem_are_refused(searched, tmp_path):
    other = replace(RUN, search=replace(RUN.search, iterations=4))
    with pytest.raises(BadInputError, match="different configuration"):
        tree_run(searched["thinker"], searched["problems"], searched["folder"], other)
    changed = [replace(searched["problems"][0], gold="12345")]
    with pytest.raises(BadInputError, match="another question or gold"):
        tree_run(searched["thinker"], changed, searched["folder"], RUN)


def test_the_budget_stops_the_run_before_a_cut_tree_is_recorded(searched, tmp_path):
    summary = tree_run(searched["thinker"], searched["problems"], tmp_path / "b", replace(RUN, budget=6))
    assert summary["stopped"] == "token budget spent" and summary["problems"] == 0
    assert (tmp_path / "b" / TREES).read_text() == ""


def test_pair_rules_on_a_hand_made_tree(tmp_path):
    """Root with four children: Q +1 (correct below), +0.5 (both), -0.5 (both), -1 (wrong below); one grandchild."""
    def node(i, parent, step, value, correct, visits=2, depth=1):
        return {"id": i, "parent": parent, "depth": depth, "step": step, "finished": False, "visits": visits,
                "value": value, "outcomes": [{"rollout": "", "answer": "x", "correct": c, "finish": "stop"}
                                             for c in correct]}

    tree = [{"id": 0, "parent": None, "depth": 0, "step": "", "finished": False, "visits": 9, "value": 0.5},
            node(1, 0, "Add the tens: 30 + 50 = 80.", 1.0, [True]),
            node(2, 0, "Add the ones first: 8 + 7 = 15.", 0.75, [True, False]),
            node(3, 0, "Add the ones first: 8 + 7 = 16.", 0.25, [True, False]),
            node(4, 0, "Subtract them: 38 - 47 = -9.", 0.0, [False]),
            node(5, 1, "Then 80 + 15 = 95.", 1.0, [True], visits=1, depth=2),
            node(6, 1, "So the sum is 80 + 5, which is 85.", 0.0, [False], visits=1, depth=2)]
    pairs = step_pairs(tree, "p", "What is 38 + 47?", PairFilter(margin=0.5, max_similarity=0.9))
    got = {(p["chosen"][0][:12], p["rejected"][0][:12]) for p in pairs if not p["prefix"]}
    # top-2 with a correct leaf (1, 2) against bottom-2 with a wrong one (4, 3); 2 vs 3 differ by one digit: dropped
    assert got == {("Add the tens", "Subtract the"), ("Add the tens", "Add the ones"),
                   ("Add the ones", "Subtract the")}
    deeper = [p for p in pairs if p["prefix"]]
    assert deeper == [{"id": "p", "prompt": "What is 38 + 47?", "prefix": ["Add the tens: 30 + 50 = 80."],
                       "chosen": ["Then 80 + 15 = 95."], "rejected": ["So the sum is 80 + 5, which is 85."],
                       "chosen_value": 1.0, "rejected_value": -1.0}]
    assert step_pairs(tree, "p", "q", PairFilter(margin=2.01)) == []
    loose = step_pairs(tree, "p", "q", PairFilter(margin=0.5, max_similarity=1.0))  # only exact copies dropped
    assert len(loose) == len(pairs) + 1
    from thinktime.bootstrap.reward_training import load_step_rows

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert len(load_step_rows("ppm", [str(tmp_path / "pairs.jsonl")])) == len(pairs)  # what `train ppm` reads
    best = best_chains(tree, 2, "\n\n")  # ranked by the mean Q of their path: node 5 (1, 1), then node 1 (1)
    assert [text for text, _ in best] == ["Add the tens: 30 + 50 = 80.\n\nThen 80 + 15 = 95.",
                                          "Add the tens: 30 + 50 = 80."]


def _command(folder: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "thinktime.cli", "tree-pairs", "-d", "arith:1", "-n", "3", "-i", "1",
            "--step-tokens", "8", "--rollout-tokens", "8", "--eval-problems", "0", "--no-think",
            "--model", "smollm2-135m",
            "-o", str(folder), *extra]


def test_bad_settings_are_refused_before_the_model_loads(tmp_path):
    for flag, value, message in (("--margin", "3", "--margin must be in [0, 2]"),
                                 ("--iterations", "0", "--iterations must be at least 1"),
                                 ("--temperature", "0", "--temperature must be above 0"),
                                 ("--max-similarity", "0", "--max-similarity")):
        result = subprocess.run(_command(tmp_path / "x", flag, value), capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


def test_a_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    folder = tmp_path / "run"
    trees = folder / TREES
    kept = kill_after_first_line(_command(folder), trees, torn=b'{"id": "arith-L1-0002", "tre')
    done = kept.count(b"\n")
    assert 1 <= done < 3
    resumed = resume(_command(folder))
    assert f"resuming, {done}/3 trees done" in resumed.stderr
    after = trees.read_bytes()
    assert after.startswith(kept)  # nothing recorded before the kill was redone or rewritten
    assert sorted(json.loads(line)["id"] for line in after.decode().splitlines()) == \
        [f"arith-L1-{i:04d}" for i in range(3)]
    assert json.loads((folder / "summary.json").read_text())["problems"] == 3


def test_a_bootstrap_round_from_tree_search_writes_its_rows_and_step_pairs(searched, tmp_path):
    from thinktime.bootstrap.data import read_jsonl
    from thinktime.bootstrap.tree_round import tree_round

    search = replace(RUN.search, iterations=1, step_tokens=8, rollout_tokens=12)
    stats = tree_round(searched["thinker"], searched["problems"], tmp_path, search, round_index=2, keep=1,
                       log=lambda message: None)
    assert stats["round"] == 2 and stats["problems"] == 1
    trees = _rows(tmp_path / "tree" / TREES)
    config = json.loads((tmp_path / "tree" / "config.json").read_text())["config"]
    assert len(trees) == 1 and config["search"]["seed"] == search.seed + 100_003 * 2  # the round's own seeds
    assert read_jsonl(tmp_path / "pairs.jsonl") == []
    for name, count in (("sft.jsonl", stats["sft_rows"]), ("step-pairs.jsonl", stats["step_pairs"])):
        rows = read_jsonl(tmp_path / name)
        assert len(rows) == count and all(row["round"] == 2 for row in rows)


def test_round_data_settings_that_cannot_work_are_refused():
    from thinktime.bootstrap.tree_round import check_round_data

    check_round_data("tree", "star", 0)
    for args, message in ((("trees", "star", 0), "unknown --round-data"), (("tree", "grpo", 0), "GRPO samples its own"),
                          (("tree", "star", 4), "--compare-n")):
        with pytest.raises(BadInputError, match=message):
            check_round_data(*args)


def test_bootstrap_takes_a_round_s_data_from_tree_search(tmp_path):
    base = [sys.executable, "-m", "thinktime.cli", "bootstrap", "-d", "arith:1", "--round-data", "tree"]
    refused = subprocess.run([*base, "--method", "grpo", "-o", str(tmp_path / "g")], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "GRPO samples its own" in refused.stderr
    assert not (tmp_path / "g" / "config.json").exists()
    out = tmp_path / "run"
    result = subprocess.run([*base, "--rounds", "1", "--no-train", "--train-problems", "1", "--eval-problems", "1",
                             "--tree-iterations", "1", "--max-new-tokens", "12", "--model", "smollm2-135m",
                             "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data (tree search)" in result.stderr
    round_1 = out / "round-1"
    assert len(_rows(round_1 / "tree" / TREES)) == 1
    stats = json.loads((round_1 / "stats.json").read_text())
    assert stats["data"] == "tree" and stats["problems"] == 1
    assert json.loads((out / "config.json").read_text())["round_data"] == "tree"
