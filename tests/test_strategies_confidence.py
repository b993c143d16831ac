"""Confidence from log-probabilities (thinktime.confidence) and self-consistency's DeepConf rules, on the embedded
model through the llama.cpp and transformers engines; engines without log-probabilities are refused before anything is
generated."""
from __future__ import annotations

import pytest

from thinktime.confidence import RunningGroup, lowest_group_confidence, threshold, token_confidence
from thinktime.errors import BadInputError
from thinktime.types import TokenLogprob

QUESTION = "What is 3 + 4?"


def entry(*logprobs: float) -> TokenLogprob:
    return TokenLogprob(0, "x", logprobs[0], [(i, "x", lp) for i, lp in enumerate(logprobs)])


def test_confidence_is_the_weakest_stretch_of_the_chain():
    sure, unsure = entry(-0.01, -5.0, -6.0), entry(-1.0, -1.1, -1.2)
    assert token_confidence(sure.top) > token_confidence(unsure.top)
    chain = [sure] * 10 + [unsure] * 3 + [sure] * 10
    assert lowest_group_confidence(chain, 3) == pytest.approx(token_confidence(unsure.top))
    assert lowest_group_confidence(chain[:2], 3) == pytest.approx(token_confidence(sure.top))  # shorter than a window
    assert lowest_group_confidence(None, 3) is None
    group = RunningGroup(2)
    assert group.push(sure.top) is None and group.push(unsure.top) == pytest.approx(
        (token_confidence(sure.top) + token_confidence(unsure.top)) / 2)
    assert threshold([1.0, 2.0, 3.0, 4.0, 5.0], keep=0.1) == pytest.approx(4.6)
    assert threshold([1.0, 2.0, 3.0, 4.0, 5.0], keep=1.0) == 1.0


@pytest.fixture(scope="module")
def plain(llama_engine):
    from thinktime import Thinker

    return Thinker(engine=llama_engine, think=False, max_new_tokens=40)


def test_confidence_weighted_vote_with_a_filter(plain):
    result = plain.solve(QUESTION, strategy="self-consistency", seed=3,
                         options={"n": 6, "weights": "confidence", "keep": 0.5, "confidence": 1.0})
    confidence = result.details["confidence"]
    assert len(confidence["chains"]) == 6 and all(c is not None and c > 0 for c in confidence["chains"])
    voted = sum(v["votes"] for v in result.details["votes"])
    assert voted <= 3  # only the more confident half votes
    for vote in result.details["votes"]:
        assert vote["weight"] == pytest.approx(sum(confidence["chains"][m] for m in vote["members"]), rel=1e-3)
    assert [c.score for c in result.candidates] == confidence["chains"]


def test_early_stop_learns_from_the_first_round_and_stops_later_chains(plain):
    result = plain.solve(QUESTION, strategy="self-consistency", seed=5, max_new_tokens=60,
                         options={"n": 8, "round": 4, "early_stop": True, "keep": 0.9, "window": 8,
                                  "confidence": 1.0})
    confidence = result.details["confidence"]
    assert confidence["stop_level"] is not None
    warm = sorted(confidence["chains"][:4])
    assert warm[0] <= confidence["stop_level"] <= warm[-1]
    stopped = [c for c in result.candidates[4:] if c.finish_reason == "low_confidence"]
    assert confidence["stopped_chains"] == len(stopped)
    assert all(c.finish_reason != "low_confidence" for c in result.candidates[:4])  # the warm-up runs in full
    members = {m for v in result.details["votes"] for m in v["members"]}
    assert not members & {i for i, c in enumerate(result.candidates) if c.finish_reason == "low_confidence"}


def test_confidence_rules_need_an_engine_with_log_probabilities(engine):
    from strategy_doubles import ScriptedEngine

    from thinktime import Thinker

    scripted = ScriptedEngine(lambda prompt, k: "The answer is \\boxed{7}.")  # an engine without log-probabilities
    with pytest.raises(BadInputError, match="scripted engine"):
        Thinker(engine=scripted, think=False).solve(QUESTION, strategy="self-consistency",
                                                    options={"n": 2, "weights": "confidence"})
    assert scripted.calls == []  # refused before anything was generated
    thinker = Thinker(engine=engine, think=False, max_new_tokens=8)
    with pytest.raises(BadInputError, match="round below n"):
        thinker.solve(QUESTION, strategy="self-consistency", options={"n": 2, "early_stop": True})


def test_one_budget_for_many_questions_goes_where_votes_are_unsettled(plain):
    questions = ["What is 3 + 4?", "What is 10 + 20?", "Name a colour."]
    results = plain.solve_allocated(questions, total_tokens=600, first=2, step=2, most=6, seed=1,
                                    max_new_tokens=24)
    assert [r.question for r in results] == questions
    spent = sum(r.usage.completion_tokens for r in results)
    assert 0 < spent <= 600 and all(r.details["allocation"]["spent"] == spent for r in results)
    samples = [r.details["samples"] for r in results]
    assert all(2 <= s <= 6 and s % 2 == 0 for s in samples)
    for r in results:  # every chain drawn is counted, and every vote is one of them
        assert len(r.candidates) == r.details["samples"]
        assert sum(v["votes"] for v in r.details["votes"]) <= r.details["samples"]
    tight = plain.solve_allocated(questions, total_tokens=60, first=2, step=2, most=6, seed=1, max_new_tokens=24)
    assert sum(r.usage.completion_tokens for r in tight) <= 60  # a budget too small for a second round
    with pytest.raises(BadInputError):
        plain.solve_allocated(questions, total_tokens=0)


def test_later_rounds_go_only_to_the_least_settled_questions():
    """A question whose chains agree waits while one whose chains split takes every later round the budget allows
    (a greedy over the lead, batched): the splitting one ends with 6 chains, the agreeing ones keep their first 2."""
    from strategy_doubles import ScriptedEngine

    from thinktime import Thinker

    def script(prompt, k):
        split = "split" in prompt.messages[-1]["content"]
        return f"The answer is \\boxed{{{1 + k % 2 if split else 7}}}."

    questions = ["Agreeing: what is 3 + 4?", "A split: what is 1 or 2?", "Agreeing too: what is 2 + 5?"]
    thinker = Thinker(engine=ScriptedEngine(script), think=False, max_new_tokens=32)
    probe = thinker.solve_allocated(questions[:1], total_tokens=1000, first=1, step=1, most=1)[0]
    chain = probe.usage.completion_tokens  # every scripted chain here is this long, and the cap says so up front
    results = Thinker(engine=ScriptedEngine(script), think=False, max_new_tokens=chain).solve_allocated(
        questions, total_tokens=10 * chain, first=2, step=2, most=6)
    assert [r.details["samples"] for r in results] == [2, 6, 2]
    assert sum(r.usage.completion_tokens for r in results) == 10 * chain
    assert [r.answer for r in results] == ["7", "1", "7"]  # the split's tie goes to the answer sampled first


def test_allocation_ends_when_the_engine_returns_nothing():
    """An engine that returns no chains (a cancelled call) ends the rounds instead of asking again forever."""
    import threading

    from strategy_doubles import ScriptedEngine

    from thinktime import Thinker

    class Drying(ScriptedEngine):
        def generate(self, prompts, params, cancel=None):
            rows = super().generate(prompts, params, cancel)
            return rows if len(self.calls) == 1 else [[] for _ in prompts]

    engine = Drying(lambda prompt, k: f"The answer is \\boxed{{{k}}}.")  # every chain differs: never settled
    thinker, results = Thinker(engine=engine, think=False, max_new_tokens=8), []

    def solve():
        results.extend(thinker.solve_allocated(["Pick a number."], total_tokens=1000, first=2, step=2, most=8))

    worker = threading.Thread(target=solve, daemon=True)  # daemon: a loop that never ends must not hang pytest
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and len(engine.calls) == 2
    assert results[0].details["samples"] == 2


def test_probing_stops_chains_whose_answers_agree(plain):
    result = plain.solve(QUESTION, strategy="self-consistency", seed=2, max_new_tokens=64,
                         options={"n": 3, "probe": 8, "probe_agree": 2, "confidence": 1.0})
    assert len(result.candidates) == 3
    assert result.usage.completion_tokens >= sum(c.usage.completion_tokens for c in result.candidates)
    for candidate in result.candidates:
        assert candidate.usage.completion_tokens <= 64 + 24  # its tokens and its last probe's
        if "So the final answer is \\boxed{" in candidate.text:  # stopped by its probes: the probe closes it
            assert candidate.finish_reason == "stop" and candidate.answer is not None
    with pytest.raises(BadInputError, match="one of them"):
        plain.solve(QUESTION, strategy="self-consistency", options={"n": 2, "probe": 8, "weights": "confidence"})
