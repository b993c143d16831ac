"""Strategy decision logic on a scripted engine: exact votes, ties, early stops, budget cuts, pruning, backup."""
from __future__ import annotations

import pytest
from strategy_doubles import FixedScorer, ScriptedEngine

from thinktime.errors import BadInputError
from thinktime.strategies import Budget, Context, get_strategy
from thinktime.strategies.self_consistency import leader_probability, stop_reason
from thinktime.types import Prompt, SamplingParams
from thinktime.voting import group_answers

QUESTION = "What is 6 times 7?"


def make_ctx(engine, strategy, budget=None, max_new_tokens=50, events=None, **options):
    ctx = Context(QUESTION, Prompt.of([{"role": "user", "content": QUESTION}]), engine,
                  SamplingParams(max_new_tokens=max_new_tokens, seed=0), Budget(budget), options=options)
    if events is not None:
        ctx.emit = events.append
    return ctx


def solve(engine, strategy, **kw):
    return get_strategy(strategy)(make_ctx(engine, strategy, **kw))


def boxed(x):
    return f"so the answer is \\boxed{{{x}}}"


# --- self-consistency -------------------------------------------------------------------------

def test_majority_over_equivalent_answers():
    engine = ScriptedEngine([boxed("\\frac{1}{2}"), boxed("3"), boxed("0.5"), boxed("1/2")])
    result = solve(engine, "self-consistency", n=4)
    assert len(engine.calls) == 1 and engine.calls[0][1].n == 4  # one batched call
    assert engine.calls[0][1].temperature > 0  # N greedy copies would be pointless
    assert result.answer == "\\frac{1}{2}"
    assert result.details["votes"][0] == {"answer": "\\frac{1}{2}", "votes": 3, "members": [0, 2, 3]}
    assert [c.votes for c in result.candidates] == [3, 1, 3, 3]
    assert result.usage.completion_tokens == sum(c.usage.completion_tokens for c in result.candidates)


def test_tie_goes_to_the_answer_sampled_first():
    engine = ScriptedEngine([boxed(5), boxed(4), boxed(4), boxed(5), "no answer here"])
    result = solve(engine, "self-consistency", n=5)
    assert result.answer == "5"
    assert [(v["answer"], v["votes"]) for v in result.details["votes"]] == [("5", 2), ("4", 2)]
    assert result.candidates[4].votes is None  # no answer: no vote


def test_stops_once_the_leader_cannot_be_overtaken():
    engine = ScriptedEngine([boxed(7)] * 8)
    events = []
    result = solve(engine, "self-consistency", n=8, round=2, confidence=1.0, events=events)
    # after 2: 2 > 0 + 6? no; after 4: 4 > 4? no; after 6: 6 > 2 -> stop
    assert result.details["samples"] == 6 and len(engine.calls) == 3
    assert result.details["stopped_early"] and result.details["stop_reason"].startswith("decided")
    progress = [e.data["samples"] for e in events if e.kind == "progress"]
    assert progress == [2, 4, 6]


def test_stops_once_confident():
    engine = ScriptedEngine([boxed(7)] * 16)
    result = solve(engine, "self-consistency", n=16, round=4, confidence=0.95)
    assert result.details["samples"] == 4  # P(Beta(5,1) > 1/2) = 31/32 >= 0.95
    assert result.details["stop_reason"].startswith("confident")


def test_leader_probability_is_the_beta_tail():
    assert leader_probability(1, 0) == pytest.approx(0.75)
    assert leader_probability(4, 0) == pytest.approx(31 / 32)
    assert leader_probability(2, 2) == pytest.approx(0.5)
    assert stop_reason(group_answers(["1", "2"]), 3, 1.0) is None


def test_budget_splits_evenly_and_keeps_the_best_so_far():
    engine = ScriptedEngine(["one two three four five six seven eight nine ten " + boxed(1)] * 4)
    result = solve(engine, "self-consistency", n=4, budget=20)
    assert engine.calls[0][1].max_new_tokens == 5
    assert result.usage.completion_tokens == 20
    assert result.finish_reason == "length"


def test_budget_of_zero_gives_an_empty_result():
    engine = ScriptedEngine([boxed(1)])
    result = solve(engine, "self-consistency", n=4, budget=0)
    assert engine.calls == [] and result.answer is None and result.usage.completion_tokens == 0
    assert result.details["stop_reason"] == "budget exhausted"


def test_rounds_share_the_budget_as_one_call_would():
    # Budget 80 over 8 chains is 10 tokens a chain, in one call or in rounds of 2: the first round
    # must not take it all, and a run stopped early leaves the rest unspent.
    for size in (8, 2):
        engine = ScriptedEngine([boxed(1), boxed(2)] * 10)
        result = solve(engine, "self-consistency", n=8, round=size, confidence=1.0, budget=80, max_new_tokens=40)
        caps = [params.max_new_tokens for _, params in engine.calls]
        assert len(caps) == 8 // size and caps[0] == 10 and min(caps) >= 10  # what a short chain leaves, flows on
        assert result.details["samples"] == 8 and result.usage.completion_tokens <= 80


def test_rounds_stop_when_the_budget_runs_out():
    # Fewer tokens than chains still to sample: not even one token each, so nothing more is drawn
    engine = ScriptedEngine(["1 2 3 4 5 6 7 8 9 " + boxed(1)] * 10)
    events = []
    result = solve(engine, "self-consistency", n=8, round=2, confidence=1.0, budget=5, events=events)
    assert engine.calls == [] and result.details["stop_reason"] == "budget exhausted"
    assert [e for e in events if e.kind == "candidate_started"] == []  # no chain announced that never ran


def test_guesses_of_chains_cut_short_never_stop_sampling_early():
    # Two cut chains whose last number is 3 would "decide" the vote, but the third chain boxes 12:
    # a real answer voids the guesses, so sampling goes on.
    engine = ScriptedEngine(["I add 1 2 3 and keep going for a while longer"] * 2 + [boxed(12)])
    result = solve(engine, "self-consistency", n=3, round=1, max_new_tokens=8)
    assert result.details["samples"] == 3 and result.answer == "12"


def test_unknown_and_bad_options_are_refused():
    engine = ScriptedEngine([])
    with pytest.raises(BadInputError, match="no option 'widht'"):
        solve(engine, "beam", widht=3)
    with pytest.raises(BadInputError, match="must be an integer"):
        solve(engine, "self-consistency", n="many")
    with pytest.raises(BadInputError, match="bad value"):
        solve(engine, "self-consistency", n=0)


# --- best-of-n ----------------------------------------------------------------------------------

def test_best_of_n_keeps_the_top_scored_chain():
    engine = ScriptedEngine([f"step a\n\nstep {x}\n\n{boxed(x)}" for x in (1, 2, 3)])
    scorer = FixedScorer({boxed(2): 0.9, boxed(3): 0.4, boxed(1): 0.1})
    result = solve(engine, "best-of-n", n=3, scorer=scorer)
    assert result.answer == "2"
    assert [c.score for c in result.candidates] == [0.1, 0.9, 0.4]
    assert scorer.seen[0] == ["step a", "step 1", boxed(1)]  # chains are split into paragraphs


def test_best_of_n_aggregates_step_scores():
    engine = ScriptedEngine(["good\n\n" + boxed(1), "bad\n\n" + boxed(2)])
    scorer = FixedScorer({"good": 0.9, "bad": 0.1, boxed(1): 0.5, boxed(2): 0.6})
    assert solve(engine, "best-of-n", n=2, scorer=scorer, aggregate="last").answer == "2"
    engine = ScriptedEngine(["good\n\n" + boxed(1), "bad\n\n" + boxed(2)])
    assert solve(engine, "best-of-n", n=2, scorer=scorer, aggregate="min").answer == "1"


def test_weighted_majority_sums_scores_per_answer():
    engine = ScriptedEngine([boxed(1), boxed(2), boxed("2.0"), boxed(1)])
    scorer = FixedScorer({boxed(1): 0.3, boxed(2): 0.5, boxed("2.0"): 0.45})
    result = solve(engine, "best-of-n", n=4, scorer=scorer, select="weighted")
    assert result.answer == "2"  # 0.95 against 0.6; the single best chain would also say 2
    assert result.details["votes"][0]["weight"] == pytest.approx(0.95)
    scorer = FixedScorer({boxed(1): 0.6, boxed(2): 0.7, boxed("2.0"): 0.0})
    engine = ScriptedEngine([boxed(1), boxed(2), boxed("2.0"), boxed(1)])
    assert solve(engine, "best-of-n", n=4, scorer=scorer, select="weighted").answer == "1"  # 1.2 vs 0.7


def test_self_judging_uses_the_policy_model_and_its_budget():
    def script(prompt, k):
        if "proposed solution" in prompt.messages[-1]["content"]:  # a judge prompt
            return "checked \\boxed{yes}" if "42" in prompt.messages[-1]["content"] else "\\boxed{no}"
        return [boxed(41), boxed(42), boxed(43)][k]

    engine = ScriptedEngine(script)
    result = solve(engine, "best-of-n", n=3, scorer="self")
    assert result.answer == "42" and [c.score for c in result.candidates] == [0.0, 1.0, 0.0]
    assert len(engine.calls) == 2 and engine.calls[1][1].n == 1 and len(engine.calls[1][0]) == 3
    judged = sum(c.usage.completion_tokens for c in result.candidates)
    assert result.usage.completion_tokens > judged  # judging tokens are counted too


# --- reflect ------------------------------------------------------------------------------------

def test_reflect_corrects_until_confirmed():
    replies = iter([boxed(41), "that is off by one \\boxed{wrong}", boxed(42), "all good \\boxed{correct}"])
    engine = ScriptedEngine(lambda prompt, k: next(replies))
    result = solve(engine, "reflect", rounds=3)
    assert result.answer == "42" and result.details["confirmed"]
    assert [r["verdict"] for r in result.details["rounds"]] == ["wrong", "correct"]
    correction = engine.calls[2][0][0].messages
    assert correction[-1]["role"] == "user" and "off by one" in correction[-1]["content"]
    # the model's own solution, then the critique with the request to solve again
    assert [m["role"] for m in correction] == ["user", "assistant", "user"]


def test_reflect_stops_after_the_rounds():
    engine = ScriptedEngine(lambda prompt, k: "\\boxed{wrong}" if "Check the solution" in
                            prompt.messages[-1]["content"] else boxed(1))
    result = solve(engine, "reflect", rounds=2)
    assert len(result.candidates) == 3 and not result.details["confirmed"]
    assert result.details["stop_reason"] == "rounds used up"


# --- budget forcing -----------------------------------------------------------------------------

def test_budget_forcing_replaces_an_early_end_with_wait():
    engine = ScriptedEngine(lambda prompt, k: "short " + boxed(1) if "Wait" not in prompt.prefix else ", longer " +
                            boxed(2))
    result = solve(engine, "budget", min_tokens=20, max_waits=2)  # each piece is 7 tokens
    assert result.details["waits"] == 2
    assert [p.prefix for p in (c[0][0] for c in engine.calls)][1].endswith("Wait")
    assert result.text.count("Wait") == 2 and result.answer == "2"


def test_budget_forcing_cuts_and_asks_for_the_answer():
    engine = ScriptedEngine(lambda prompt, k: "7}" if prompt.prefix.endswith("\\boxed{") else "a b c d e f g h i j")
    result = solve(engine, "budget", max_tokens=4)
    assert result.details["forced_answer"] and result.details["thinking_tokens"] == 4
    assert result.text == "a b c d \n\nFinal answer: \\boxed{7}" and result.answer == "7"


def test_budget_forcing_uses_the_chinese_wait_for_chinese_questions():
    engine = ScriptedEngine(lambda prompt, k: "好" if "等等" not in prompt.prefix else "好的 \\boxed{1}")
    ctx = make_ctx(engine, "budget", min_tokens=3, max_waits=1)
    ctx.question = "一加一等于几？"
    result = get_strategy("budget")(ctx)
    assert "等等" in result.text and result.details["waits"] == 1


# --- beam and mcts ------------------------------------------------------------------------------

def tree_script(prompt, k):
    """Steps named by their path: after prefix 'A\\n\\n' come 'A0' and 'A1'; depth 3 gives an answer."""
    steps = [s for s in prompt.prefix.split("\n\n") if s]
    if len(steps) == 2:
        return boxed(steps[-1] + str(k)) + "\n\nrest"
    return (steps[-1] if steps else "") + "ABCD"[k] + "\n\nignored"


def test_beam_prunes_to_the_best_scored():
    scorer = FixedScorer({"A": 0.2, "B": 0.9, "BA": 0.5, "BB": 0.7})
    engine = ScriptedEngine(tree_script)
    result = solve(engine, "beam", width=1, expansions=2, depth=3, scorer=scorer)
    assert [p.prefix for p in engine.calls[1][0]] == ["B\n\n"]  # A was pruned
    assert [p.prefix for p in engine.calls[2][0]] == ["B\n\nBB\n\n"]
    nodes = {n["step"]: n for n in result.details["tree"]}
    assert nodes["A"]["pruned"] and nodes["BA"]["pruned"] and "pruned" not in nodes["B"]
    assert result.answer == "BB0"  # first finished (equal scores: the older wins)
    assert all(call[1].stop == ("\n\n",) for call in engine.calls)


def test_beam_keeps_width_and_finishes():
    scorer = FixedScorer({"A": 0.9, "B": 0.2, "AB": 0.5, boxed("AB1"): 0.8})
    engine = ScriptedEngine(tree_script)
    result = solve(engine, "beam", width=2, expansions=2, depth=5, scorer=scorer)
    assert len(engine.calls[1][0]) == 2 and result.answer == "AB1"
    assert result.details["stop_reason"] == "enough chains finished"
    assert result.candidates[0].score == 0.8


def test_mcts_backs_scores_up_the_path():
    scorer = FixedScorer({"A": 0.2, "B": 0.6, "BA": 1.0, "BB": 0.0})
    engine = ScriptedEngine(tree_script)
    result = solve(engine, "mcts", iterations=2, expansions=2, depth=5, exploration=0.0, scorer=scorer)
    nodes = {n["step"]: n for n in result.details["tree"]}
    # iteration 1 expands the root: A and B get one visit each; iteration 2 picks B (0.6 > 0.2)
    assert nodes["A"]["visits"] == 1 and nodes["A"]["value"] == 0.2
    assert nodes["B"]["visits"] == 3 and nodes["B"]["value"] == pytest.approx((0.6 + 1.0 + 0.0) / 3, abs=1e-4)
    assert nodes[""]["visits"] == 4 and nodes[""]["value"] == pytest.approx((0.2 + 0.6 + 1.0 + 0.0) / 4, abs=1e-4)
    assert result.text == "B\n\nBA"  # nothing finished: the most-visited path


def test_mcts_picks_the_best_finished_chain():
    scorer = FixedScorer({"A": 0.1, "B": 0.6, "BA": 0.7, "BB": 0.3, boxed("BA0"): 0.9, boxed("BA1"): 0.2})
    engine = ScriptedEngine(tree_script)
    result = solve(engine, "mcts", iterations=4, expansions=2, depth=5, exploration=0.0, scorer=scorer)
    assert result.answer == "BA0"
    assert result.candidates[0].score == 0.9


def test_search_stops_at_the_budget():
    engine = ScriptedEngine(tree_script)
    result = solve(engine, "beam", width=2, expansions=2, depth=6, budget=5, scorer=FixedScorer({}))
    assert result.usage.completion_tokens <= 5
    assert result.details["stop_reason"] == "budget exhausted"


def test_a_chain_cut_short_votes_no_last_number_guess():
    """Three chains cut mid-arithmetic end on an intermediate 6; two finished chains box 42: 42 wins."""
    texts = ["so the answer is \\boxed{42}", "6 times 7: first 6 plus 6 is 12, and 6 plus 6 is 18, and so on"]
    engine = ScriptedEngine(lambda prompt, k: texts[[0, 1, 1, 0, 1][k]])
    result = solve(engine, "self-consistency", n=5, max_new_tokens=12)
    assert result.answer == "42" and [v["answer"] for v in result.details["votes"]] == ["42"]


def test_budget_forcing_lets_a_think_tag_model_finish_its_own_answer():
    """After the model closes </think> itself, its answer gets what is left of max_new_tokens, not answer_tokens."""
    summary = " ".join(["word"] * 80) + " so the answer is \\boxed{42}"
    engine = ScriptedEngine(lambda prompt, k: "thinking done </think>" if "</think>" not in prompt.prefix else summary)
    result = solve(engine, "budget", think_tags=True, max_new_tokens=400, answer_tokens=16)
    assert result.answer == "42" and result.answer_method == "boxed"


def test_a_negated_verdict_word_is_no_verdict():
    from thinktime.scorers.self_judge import parse_verdict

    for text in ("The solution is not correct.", "I checked every step and found no errors.", "解答没有错误。"):
        assert parse_verdict(text) is None, text
    assert parse_verdict("The answer is correct.") is True and parse_verdict("This is wrong.") is False
    assert parse_verdict("\\boxed{wrong} It is not correct.") is False  # a boxed verdict still decides
    for text in ("There is nothing wrong with this solution.", "I see nothing wrong.", "Is the solution wrong? No."):
        assert parse_verdict(text) is None, text
    # a judgement cut by its token limit stopped mid-thought: only a boxed verdict in it counts
    assert parse_verdict("Let me check whether the first step is correct", finished=False) is None
    assert parse_verdict("\\boxed{yes} and more", finished=False) is True


def test_solve_many_keeps_each_questions_budget():
    from thinktime import Thinker

    engine = ScriptedEngine(lambda prompt, k: " ".join(["step"] * 12))
    results = Thinker(engine=engine, budget_tokens=5, max_new_tokens=50).solve_many(["a?", "b?"])
    assert [r.usage.completion_tokens for r in results] == [5, 5]


# --- reviews' findings: turn ends, cut judgements, n=1, languages, context windows, cancels ----------

def test_a_step_that_ends_the_turn_ends_the_chain_even_without_a_box():
    # "The answer is 4." ended the model's turn (no delimiter followed): the chain is finished, and the
    # model is never asked to continue a reply it had already ended.
    engine = ScriptedEngine(lambda prompt, k: "The answer is 4." if prompt.prefix else "Add 2 and 2.\n\nmore")
    result = solve(engine, "beam", width=1, expansions=1, depth=5, scorer=FixedScorer({}))
    assert len(engine.calls) == 2 and result.details["stop_reason"] == "enough chains finished"
    assert result.text == "Add 2 and 2.\n\nThe answer is 4." and result.answer == "4"
    # an empty step cut by the delimiter is not a finished chain (it used to beat every scored chain)
    engine = ScriptedEngine(lambda prompt, k: ["\n\nx", "Add 2 and 2.\n\nmore"][k] if not prompt.prefix
                            else boxed(4))
    result = solve(engine, "beam", width=2, expansions=2, depth=3, scorer=FixedScorer({}))
    assert result.answer == "4" and all(n["step"] for n in result.details["tree"][1:])


def test_a_judgement_cut_short_is_no_verdict():
    def script(prompt, k):
        if "proposed solution" in prompt.messages[-1]["content"]:  # the judge thinks aloud, and is cut
            return "Let me check whether the first step is correct or not, slowly and carefully " + "\\boxed{no}"
        return [boxed(5), boxed(4)][k]

    result = solve(ScriptedEngine(script), "best-of-n", n=2, scorer="self", judge_tokens=8)
    assert [c.score for c in result.candidates] == [0.5, 0.5] and result.answer == "5"  # no verdicts: a tie


def test_best_of_one_is_not_judged_and_keeps_the_whole_budget():
    engine = ScriptedEngine(lambda prompt, k: boxed(4))
    result = solve(engine, "best-of-n", n=1, scorer="self", budget=100, max_new_tokens=100)
    assert len(engine.calls) == 1 and engine.calls[0][1].max_new_tokens == 100
    assert result.answer == "4" and result.candidates[0].score is None


def test_weighted_best_of_n_does_not_let_guesses_vote():
    engine = ScriptedEngine(["I add 1 2 3 and keep going for a while longer"] * 2 + [boxed(12)])
    result = solve(engine, "best-of-n", n=3, scorer=FixedScorer({}), select="weighted", max_new_tokens=8)
    assert result.answer == "12"


def test_best_of_n_refuses_an_empty_delimiter_before_generating():
    engine = ScriptedEngine([])
    with pytest.raises(BadInputError, match="bad value"):
        solve(engine, "best-of-n", n=2, delimiter="")
    assert engine.calls == []


def test_reflect_leaves_room_for_a_check_under_a_budget():
    replies = iter(["1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 " + boxed(4), "fine \\boxed{correct}"])
    engine = ScriptedEngine(lambda prompt, k: next(replies))
    result = solve(engine, "reflect", budget=40, max_new_tokens=40, check_tokens=16)
    assert len(engine.calls) == 2 and result.details["rounds"][0]["verdict"] == "correct"
    assert result.usage.completion_tokens <= 40


def test_reflect_and_budget_forcing_stop_when_the_context_window_is_full():
    # Each round adds a solution and a critique to the conversation: once the window is full, the last
    # solution is kept and the reason said, instead of the engine's error after the tokens were spent.
    engine = ScriptedEngine(lambda prompt, k: "\\boxed{wrong} " + "x " * 10 if "Check" in
                            prompt.messages[-1]["content"] else "y " * 10 + boxed(1), context_length=70)
    result = solve(engine, "reflect", rounds=5)
    assert result.details["stop_reason"] == "the context window is full" and result.answer == "1"
    engine = ScriptedEngine(lambda prompt, k: "a " * 100, context_length=40)
    result = solve(engine, "budget", max_new_tokens=200, max_tokens=150)
    assert result.details["stop_reason"] == "the context window is full"
    assert result.details["forced_answer"] is False


def test_a_cancel_is_reported_as_a_cancel():
    import threading

    cancel = threading.Event()

    def script(prompt, k):
        if "proposed solution" in prompt.messages[-1]["content"]:
            return "\\boxed{yes}"
        cancel.set()  # the user stops the run while the chains are generated: the judge never runs
        return boxed(k)

    for strategy, options in (("best-of-n", {"n": 2}), ("beam", {"width": 2}), ("mcts", {"iterations": 2})):
        ctx = make_ctx(ScriptedEngine(script), strategy, scorer="self", **options)
        ctx.cancel = cancel
        result = get_strategy(strategy)(ctx)
        assert result.details["stop_reason"] == "cancelled", strategy
        assert result.details.get("unjudged", 0) == 0, strategy
        cancel.clear()


def test_the_chosen_language_reaches_what_strategies_write():
    # A Chinese question with lang="en": the Wait and the check are English, as the system prompt is.
    from thinktime.strategies import Budget, Context

    question = "五加七等于多少？"
    engine = ScriptedEngine(lambda prompt, k: "short " + boxed(12))
    ctx = Context(question, Prompt.of([{"role": "user", "content": question}]), engine,
                  SamplingParams(max_new_tokens=40, seed=0), Budget(None), options={"min_tokens": 10}, lang="en")
    get_strategy("budget")(ctx)
    assert engine.calls[1][0][0].prefix.endswith("Wait")
    engine = ScriptedEngine(lambda prompt, k: "\\boxed{correct}" if len(engine.calls) > 1 else boxed(12))
    ctx = Context(question, Prompt.of([{"role": "user", "content": question}]), engine,
                  SamplingParams(max_new_tokens=40, seed=0), Budget(None), lang="en")
    get_strategy("reflect")(ctx)
    assert engine.calls[1][0][0].messages[-1]["content"].startswith("Check the solution")


def test_mcts_reports_the_iterations_it_completed():
    engine = ScriptedEngine(tree_script)
    result = solve(engine, "mcts", iterations=8, expansions=2, depth=5, budget=6, scorer=FixedScorer({}))
    assert result.details["stop_reason"] == "budget exhausted"
    progress = [call for call in engine.calls]
    assert result.details["iterations"] == len(progress)
