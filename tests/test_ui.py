"""The web chat's logic without a browser: thinking streams into the panel, the answer lands below it,
the conversation is kept, and multi-chain strategies show their candidates."""
from __future__ import annotations

import threading

import pytest

from thinktime import Thinker
from thinktime.strategies import STRATEGIES

pytest.importorskip("gradio", reason="the web UI needs gradio (pip install thinktime[ui])")
from thinktime.ui.app import ChatSession, build  # noqa: E402


@pytest.fixture(scope="module")
def session(engine):
    return ChatSession(Thinker(engine=engine, max_new_tokens=16))


def test_thinking_streams_then_answer_and_history(session):
    panels, states = [], []
    for state in session.respond("What is 3 plus 4?", [], [], max_new_tokens=16):
        states.append(state)  # Gradio reads each state as it is yielded: snapshot the panel now
        panels.append(state[0][1]["content"])
    assert len(panels) >= 4 and len(set(panels)) >= 4  # the panel grew token by token
    chat, history, _ = states[-1]
    assert chat[0] == {"role": "user", "content": "What is 3 plus 4?"}
    thinking = chat[1]
    assert thinking["metadata"]["status"] == "done" and thinking["metadata"]["title"].startswith("Thought for")
    assert thinking["content"]
    assert chat[2]["role"] == "assistant" and chat[2]["content"]  # the answer, below the panel
    assert [m["role"] for m in history] == ["user", "assistant"]
    # a second turn sees the first one
    chat2, history2, _ = list(session.respond("And plus 1?", chat, history, max_new_tokens=4))[-1]
    assert len(history2) == 4 and chat2[:3] == chat[:3]


def test_stop_ends_the_turn(session):
    cancel = threading.Event()
    states = []
    for state in session.respond("Tell me a long story.", [], [], max_new_tokens=2000, cancel=cancel):
        states.append(state)
        if len(states) == 3:
            cancel.set()
    chat, history, _ = states[-1]
    assert chat[1]["metadata"]["status"] == "done" and chat[1]["metadata"]["title"].startswith("Stopped after")
    assert len(states) < 200


def test_multi_chain_strategy_shows_candidates(session):
    name = "self-consistency" if "self-consistency" in STRATEGIES else None
    if name is None:
        pytest.skip("self-consistency is not registered")
    chat, _, board = list(session.respond("2+2?", [], [], strategy=name, n=2, max_new_tokens=6,
                                          temperature=0.8))[-1]
    assert "candidate 1" in chat[1]["content"] and "candidate 2" in chat[1]["content"]
    assert "candidates" in board and "| 2 |" in board


@pytest.mark.parametrize("strategy", ["reflect", "budget", "beam", "mcts"])
def test_every_strategy_runs_from_the_ui_with_n_as_its_size(session, strategy):
    """N sets each strategy's own size (beam's width, mcts's iterations, reflect's rounds), never an option
    the strategy does not have; budget forcing ignores it."""
    chat, _, _ = list(session.respond("2+2?", [], [], strategy=strategy, n=2, budget=40, max_new_tokens=8))[-1]
    assert not any("⚠️" in str(message["content"]) for message in chat), chat
    assert chat[1]["metadata"]["title"].startswith("Thought for")


def test_build_has_the_controls(session):
    demo = build(session.thinker)
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"strategy", "thinking prompt language", "temperature"} <= labels
    assert any(label and label.startswith("N:") for label in labels)
    assert any(label and label.startswith("budget") for label in labels)
