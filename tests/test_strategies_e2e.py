"""Every strategy end to end on the embedded model, from Python and from the CLI (tiny n and budgets:
the model is weak, so these assert behaviour, not answers)."""
from __future__ import annotations

import json

import pytest

from thinktime.voting import vote_answers

QUESTION = "What is 3 + 4?"
SMALL = {
    "self-consistency": {"n": 3, "round": 2},
    "best-of-n": {"n": 2, "judge_tokens": 12},
    "reflect": {"rounds": 1, "check_tokens": 12},
    "budget": {"min_tokens": 20, "max_tokens": 28, "answer_tokens": 8},
    "beam": {"width": 2, "expansions": 2, "depth": 2, "step_tokens": 12, "judge_tokens": 8},
    "mcts": {"iterations": 2, "expansions": 2, "depth": 2, "step_tokens": 12, "judge_tokens": 8},
}


@pytest.fixture(scope="module")
def plain(engine):
    """No thinking system prompt: short prompts keep these tests fast (budget forcing keeps the real one)."""
    from thinktime import Thinker

    return Thinker(engine=engine, think=False, max_new_tokens=20)


@pytest.mark.parametrize("strategy", sorted(SMALL))
def test_strategy_runs_on_the_embedded_model(thinker, plain, strategy):
    events = []
    thinker = thinker if strategy == "budget" else plain
    result = thinker.solve(QUESTION, strategy=strategy, options=SMALL[strategy], max_new_tokens=20, seed=3,
                           budget_tokens=200, emit=events.append)
    assert result.strategy == strategy and result.candidates
    assert 0 < result.usage.completion_tokens <= 200
    assert result.usage.completion_tokens >= sum(c.usage.completion_tokens for c in result.candidates) or \
        strategy in ("beam", "mcts")  # search candidates share the steps of their common prefix
    assert any(e.kind == "candidate_finished" for e in events)
    assert result.details["stop_reason"]  # every strategy says why it stopped (README: Budget)
    data = result.to_dict()
    assert data["strategy"] == strategy and len(data["candidates"]) == len(result.candidates)
    if strategy in ("beam", "mcts"):
        assert result.details["tree"][0]["parent"] is None and len(result.details["tree"]) > 1
    if strategy == "self-consistency":
        # chains cut short vote their last-number guess only when no chain gave a real answer
        assert sum(v["votes"] for v in result.details["votes"]) == sum(a is not None for a in
                                                                       vote_answers(result.candidates))
    if strategy == "budget":
        assert result.details["thinking_tokens"] <= 28
        # one more call after the first: a Wait (an end before min_tokens) or the forced answer (a cut at max_tokens)
        assert result.details["calls"] >= 2 and (result.details["waits"] or result.details["forced_answer"])
    if strategy == "reflect":  # the check ran: a verdict, then a stop for a reason other than a cancel
        assert len(result.details["rounds"]) == 1 and result.details["stop_reason"] != "cancelled"


def test_self_consistency_is_deterministic_under_a_seed(plain):
    runs = [plain.solve(QUESTION, strategy="self-consistency", options={"n": 2}, max_new_tokens=12, seed=7)
            for _ in range(2)]
    assert [c.text for c in runs[0].candidates] == [c.text for c in runs[1].candidates]


def test_budget_cuts_a_strategy_gracefully(plain):
    result = plain.solve(QUESTION, strategy="self-consistency", options={"n": 4, "round": 2},
                           max_new_tokens=20, seed=1, budget_tokens=30)
    assert result.usage.completion_tokens <= 30 and result.candidates


def test_cli_json_carries_strategy_and_candidates(monkeypatch):
    from typer.testing import CliRunner

    from thinktime.cli import app

    run = CliRunner().invoke(app, ["solve", QUESTION, "--strategy", "self-consistency", "-n", "2",
                                   "--max-new-tokens", "12", "--seed", "1", "--json", "--device", "cpu",
                                   "--no-think"])
    assert run.exit_code == 0, run.output
    data = json.loads(run.stdout.strip().splitlines()[-1])
    assert data["strategy"] == "self-consistency" and len(data["candidates"]) == 2
    assert data["usage"]["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in data["candidates"])


def test_cli_shows_the_search_tree_and_refuses_bad_options():
    from typer.testing import CliRunner

    from thinktime.cli import app

    run = CliRunner().invoke(app, ["solve", QUESTION, "--strategy", "beam", "-o", "width=1", "-o", "depth=1",
                                   "-o", "step_tokens=8", "-o", "judge_tokens=4", "--show-tree",
                                   "--max-new-tokens", "8", "--device", "cpu", "--no-think"])
    assert run.exit_code == 0, run.output
    assert "search tree" in run.output
    bad = CliRunner().invoke(app, ["solve", QUESTION, "--strategy", "beam", "-o", "widht=2"])
    assert bad.exit_code == 2 and "no option 'widht'" in bad.output
