"""Where the answer starts in a stream (no model needed): tags split anywhere, plain-text chains, candidates."""
from __future__ import annotations

import random

import pytest

from thinktime.reasoning import split_reasoning
from thinktime.server.streaming import CandidateView, ReasoningStream, reply_split


def run(text: str, pieces: list[str], think_tags: bool = False, finish: str = "stop"):
    stream = ReasoningStream(think_tags)
    out = [stream.feed(p) for p in pieces] + [stream.finish(finish)]
    assert "".join(pieces) == text
    return "".join(r for r, _ in out), "".join(a for _, a in out), out


def chop(text: str, seed: int) -> list[str]:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        step = rng.randint(1, 4)
        pieces.append(text[i:i + step])
        i += step
    return pieces


@pytest.mark.parametrize("seed", range(20))
def test_think_tags_split_anywhere_match_the_final_split(seed):
    text = "<think>\nLet me add: 2+2 is 4.\n</think>\n\nThe answer is \\boxed{4}."
    reasoning, answer, out = run(text, chop(text, seed), think_tags=True)
    split = split_reasoning(text)
    assert reasoning.strip() == split.reasoning and answer.strip() == split.answer
    # the answer only starts after the tag closes, and nothing of the tag leaks out
    assert "<" not in reasoning and "think>" not in answer
    first_answer = next(i for i, (_, a) in enumerate(out) if a)
    assert all(not r for r, _ in out[first_answer:])


def test_template_opened_think_and_tags_held_back_only_briefly():
    pieces = ["I reason", " here</", "think>", "Answer", ": 5"]  # "I reason here</think>Answer: 5"
    stream = ReasoningStream(think_tags=True)
    assert stream.feed(pieces[0]) == ("I reason", "")
    assert stream.feed(pieces[1]) == (" here", "")  # "</" might start the tag: held back
    assert stream.feed(pieces[2]) == ("", "")
    assert stream.feed(pieces[3]) == ("", "Answer")
    assert stream.feed(pieces[4]) == ("", ": 5")
    assert stream.finish() == ("", "")


def test_plain_text_streams_live_and_sends_the_closing_statement_at_the_end():
    text = "First, 2+2.\n\nThat makes 4.\n\nSo the answer is \\boxed{4}."
    pieces = chop(text, 1)
    reasoning, answer, out = run(text, pieces)
    assert reasoning == text  # everything went out live as reasoning
    assert all(not a for _, a in out[:-1])  # the answer is only known at the end
    assert answer == "So the answer is \\boxed{4}." == split_reasoning(text).answer


def test_plain_text_without_a_box():
    assert reply_split("Hello!\n\nHow can I help?", "stop") == ("Hello!", "How can I help?")
    assert reply_split("Hello there", "stop") == ("", "Hello there")
    assert reply_split("Let me think about", "length") == ("Let me think about", "")
    _, answer, _ = run("Let me think", ["Let me", " think"], finish="length")
    assert answer == ""


def test_an_unclosed_tag_is_all_reasoning():
    reasoning, answer, _ = run("<think>still going", ["<thi", "nk>still", " going"], think_tags=True,
                               finish="length")
    assert reasoning == "still going" and answer == ""


def test_candidate_view_shows_the_lead_live_and_the_others_in_turn():
    view = CandidateView()
    out = view.delta(0, "zero-a ") + view.delta(1, "one-a ") + view.delta(0, "zero-b")
    assert "candidate 1" in out and "zero-a zero-b" in out and "one-a" not in out
    out += view.finish(0)
    assert "candidate 2" in out and out.endswith("one-a ")
    out += view.delta(1, "one-b") + view.finish(1)
    assert out.endswith("one-a one-b")


def test_candidate_view_for_batched_chains():
    view = CandidateView()
    lines = view.finish(0, {"answer": "4", "tokens": 12}) + view.finish(1, {"answer": "5", "tokens": 9})
    lines += view.progress({"votes": [{"answer": "4", "votes": 1}, {"answer": "5", "votes": 1}]})
    assert "candidate 1: answer 4 · 12 tokens" in lines and "candidate 2: answer 5" in lines
    assert "votes so far: 4 ×1, 5 ×1" in lines
