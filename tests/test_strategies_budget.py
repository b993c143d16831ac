"""Property: whatever the outputs and options, no strategy generates more tokens than its budget."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from strategy_doubles import ScriptedEngine

from thinktime.strategies import Budget, Context, get_strategy
from thinktime.types import Prompt, SamplingParams

WORDS = ["so", "the", "answer", "is", "\\boxed{4}", "\\boxed{5}", "yes", "no", "\\boxed{yes}", "\\boxed{wrong}",
         "\n\n", "Wait", "7"]
STRATEGY_OPTIONS = {
    "cot": {},
    "self-consistency": {"n": 3, "round": 2},
    "best-of-n": {"n": 3, "judge_tokens": 5},
    "reflect": {"rounds": 2, "check_tokens": 6},
    "budget": {"min_tokens": 10, "max_tokens": 15, "answer_tokens": 4},
    "beam": {"width": 2, "expansions": 2, "depth": 3, "step_tokens": 6, "judge_tokens": 4},
    "mcts": {"iterations": 3, "expansions": 2, "depth": 3, "step_tokens": 6, "judge_tokens": 4},
    "allocation": {"tokens": 60, "first": 2, "step": 1, "most": 4},
}


@settings(max_examples=30, deadline=None)
@given(strategy=st.sampled_from(sorted(STRATEGY_OPTIONS)), budget=st.integers(0, 80),
       max_new=st.integers(1, 40), texts=st.lists(st.lists(st.sampled_from(WORDS), max_size=30), min_size=1,
                                                  max_size=8))
def test_usage_never_exceeds_the_budget(strategy, budget, max_new, texts):
    replies = [" ".join(t) for t in texts]
    engine = ScriptedEngine(lambda prompt, k: replies[(len(engine.calls) + k) % len(replies)])
    ctx = Context("What is 2+2?", Prompt.of([{"role": "user", "content": "What is 2+2?"}]), engine,
                  SamplingParams(max_new_tokens=max_new, seed=1), Budget(budget), options=dict(STRATEGY_OPTIONS[strategy]))
    result = get_strategy(strategy)(ctx)
    assert result.usage.completion_tokens <= budget
    assert result.usage.completion_tokens == engine.completion_tokens  # exact: every token counted
    assert all(c.usage.completion_tokens <= budget for c in result.candidates)
    assert result.details["stop_reason"]  # every strategy says why it stopped


def test_search_says_how_many_nodes_went_unjudged():
    """When the budget runs out before the judge, beam and mcts score the last children a neutral 0.5: said so."""
    engine = ScriptedEngine(lambda prompt, k: "a b c\n\nd e f")
    for strategy in ("beam", "mcts"):
        ctx = Context("What is 2+2?", Prompt.of([{"role": "user", "content": "What is 2+2?"}]), engine,
                      SamplingParams(max_new_tokens=6, seed=1), Budget(6), options=dict(STRATEGY_OPTIONS[strategy]))
        result = get_strategy(strategy)(ctx)
        assert result.details["unjudged"] > 0, strategy
