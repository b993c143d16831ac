"""The STaR filter, rationalisation and pairing on fixed rationales: exact outcomes, no model."""
from __future__ import annotations

import pytest

from thinktime.bootstrap.filter import Sample, grade_texts, incorrect, keep_correct, keep_rationalised, make_pairs
from thinktime.bootstrap.hints import derives_answer, mentions_hint, quotes_hint, trim_after_derivation, with_hint

Q = "What is 47 + 38?"


# --- quoting the hint ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "47 + 38 = 85. So the answer is \\boxed{85}.",
    "First add the tens: 40 + 30 = 70. Then the ones: 7 + 8 = 15. Total: 70 + 15 = 85.",
    "47 plus 38 equals 85",
    "$47 + 38 = \\boxed{85}$",
    "47 + 38 = **85**\n\nThe answer is 85.",        # later mentions after the derivation are fine
    "47 + 38 is equal to 85.",
    "47加38等于85。",
    "Adding them: the sum of forty-seven and 38 equals 85.",
    "Let me add.\n47 + 38\n= 85",                 # the left side on the line before "="
])
def test_derived_answers_do_not_quote_the_hint(text):
    assert not quotes_hint(text, "85", Q)


@pytest.mark.parametrize("text,why", [
    ("The hint says the answer is 85, so \\boxed{85}.", "names the hint"),
    ("As HINTED, 47 + 38 = 85.", "names the hint in capitals"),
    ("根据提示，47 + 38 = 85。", "names the hint in Chinese"),
    ("The correct answer is 85. Indeed 47 + 38 = 85.", "copies the hint's wording"),
    ("The answer is 85. Check: 47 + 38 = 85.", "states the answer before deriving it"),
    ("\\boxed{85}", "never derives it"),
    ("47 + 38 makes 85.", "no result of a computation"),
    ("The answer = 85. Indeed 47 + 38 = 85.", "asserts it with '=' before deriving it"),
    ("So the final answer equals 85.", "nothing computed on the left"),
    ("Result: = 85", "an empty left side"),
    ("The **final answer** = 85", "emphasis is not arithmetic"),
    ("Step 2) The answer = 85", "a step label is not arithmetic"),
    ("The answer (for all 2 of us) = 85", "a number, but no operation"),
    ("经过进一步思考，结果等于85。", "一 inside a word is not a numeral"),
    ("We are told that 47 + 38 = 85.", "told the answer"),
    ("So 47 + 38 should equal 85, which it does.", "asserts what it should be"),
])
def test_quoting_the_hint(text, why):
    assert quotes_hint(text, "85", Q), why


def test_whole_numbers_only():
    assert derives_answer("8.5 + 76.5 = 85", "85")
    assert derives_answer("47 + 38 = 185 - 100 = 85", "85")  # 185 does not hold 85 as a whole number
    assert not derives_answer("x = 850", "85")
    assert not derives_answer("x = 8.5", "85")
    assert derives_answer("1,000 + 234 = 1,234", "1234")  # thousands separators are the same number
    assert derives_answer("5 - 12 = -7", "-7")


def test_answer_also_in_the_question_needs_a_derivation_only():
    question = "What is 60 - 30?"
    assert not quotes_hint("Take 30 away from 60: 60 - 30 = 30.", "30", question)
    assert quotes_hint("It is 30.", "30", question)


def test_mentions_and_hint_text():
    assert mentions_hint("no hint needed")
    assert not mentions_hint("47 + 38 = 85")
    hinted = with_hint(Q, "85")
    assert hinted.startswith(Q) and "85" in hinted and "hint" in hinted.lower()
    assert "提示" in with_hint("47加38等于多少?", "85", "zh")


# --- the STaR filter ----------------------------------------------------------------------------

def test_grading_uses_the_answer_fallbacks():
    samples = grade_texts(["47 + 38 = 85", "It is \\boxed{86}.", "The answer is 85.", "no idea"], "85",
                          ["stop", "stop", "length", "stop"])
    assert [s.correct for s in samples] == [True, False, True, False]
    assert [s.answer for s in samples] == ["85", "86", "85", None]
    assert [s.usable for s in samples] == [True, False, False, False]  # a cut-off chain is never kept


def test_keep_correct_distinct_in_order():
    samples = [Sample("a = 85", "85", "stop", True), Sample("wrong 84", "84", "stop", False),
               Sample("a  =  85", "85", "stop", True),   # the same text up to whitespace
               Sample("b = 85", "85", "stop", True), Sample("c: 80 + 5 = 85", "85", "length", True)]
    assert keep_correct(samples, "85", keep=1) == ["a = 85"]
    assert keep_correct(samples, "85", keep=5) == ["a = 85", "b = 85", "c: 80 + 5 = 85"]  # c: cut off, but derived
    assert keep_correct([Sample("x", "84", "stop", False)], "85", keep=3) == []


def test_cut_off_chains_are_trimmed_after_their_derivation():
    rambling = "First, 9 + 7 = 16.\n\nNow, we can find the sum of 20 and"
    assert trim_after_derivation(rambling, "16") == "First, 9 + 7 = 16."
    assert trim_after_derivation("so 9 + 7 = 16 and then", "16") == "so 9 + 7 = 16 and then"  # no sentence end
    assert trim_after_derivation("a = 9 + 7 = \\boxed{16}. More", "16") == "a = 9 + 7 = \\boxed{16}."
    assert trim_after_derivation("The answer = 16. More", "16") is None  # asserted, not derived
    assert trim_after_derivation("The sum of 9 and 7 is", "16") is None
    samples = grade_texts([rambling, "The sum of 9 and 7 is 16. Then 3", "9 + 7 = 15.\nSo"], "16",
                          ["length", "length", "length"])
    assert [s.correct for s in samples] == [False, False, False]  # the last numbers are 20, 3, 15
    assert keep_correct(samples, "16", keep=3) == ["First, 9 + 7 = 16."]
    # a trimmed chain is not also a rejected one; the others are
    assert incorrect(samples, "16") == ["The sum of 9 and 7 is 16. Then 3", "9 + 7 = 15.\nSo"]


def test_rationalisation_drops_quotes_and_counts_them():
    texts = ["The hint says 85. \\boxed{85}",           # correct but quotes the hint
             "47 + 38 = 85",                            # kept
             "47 + 38 = 84",                            # wrong
             "Answer: 85 because 47 + 38 = 85",         # states it first: quotes
             "40 + 30 = 70, 7 + 8 = 15, 70 + 15 = 85"]  # kept
    samples = grade_texts(texts, "85")
    kept, quoted = keep_rationalised(samples, "85", Q, keep=5)
    assert kept == ["47 + 38 = 85", "40 + 30 = 70, 7 + 8 = 15, 70 + 15 = 85"]
    assert quoted == 2
    assert keep_rationalised(samples, "85", Q, keep=1) == (["47 + 38 = 85"], 2)


def test_incorrect_finished_first():
    samples = [Sample("w1", "1", "length", False), Sample("ok", "85", "stop", True),
               Sample("w2", "2", "stop", False), Sample("w2", "2", "stop", False), Sample(" ", None, "stop", False)]
    assert incorrect(samples, "85") == ["w2", "w1"]


def test_pairs():
    assert make_pairs(["c1"], ["r1", "r2", "r3"], max_pairs=2) == [("c1", "r1"), ("c1", "r2")]
    assert make_pairs(["c1", "c2"], ["r1"], max_pairs=5) == [("c1", "r1"), ("c2", "r1")]
    assert make_pairs(["c1", "c2"], ["r1", "r2", "r3"], max_pairs=9) == [("c1", "r1"), ("c2", "r2"), ("c1", "r3")]
    assert make_pairs([], ["r1"], 2) == [] and make_pairs(["c1"], [], 2) == [] and make_pairs(["c"], ["r"], 0) == []


# --- best-of-n with the ORM against majority, on the same samples ---------------------------------

def test_selection_rules_on_the_same_samples():
    from thinktime.bootstrap.compare import compare_selection

    def rec(answers, golds, maj):
        return {"candidates": [{"answer": a, "correct": c} for a, c in zip(answers, golds)],
                "by_k": {"3": {"correct": maj}}}

    records = [rec(["5", "6", "6"], [True, False, False], False),   # the ORM rescues a wrong majority
               rec(["7", "7", "7"], [True, True, True], True),
               rec(["1", "2", "2"], [False, True, True], True)]     # the ORM picks the wrong chain
    scores = [[0.9, 0.1, 0.2], [0.1, 0.2, 0.3], [0.9, 0.1, 0.1]]
    result = compare_selection(records, scores, 3)
    assert result["problems"] == 3
    assert {k: result[k]["correct"] for k in ("majority", "best_of_n", "weighted", "pass", "first_sample")} == \
        {"majority": 2, "best_of_n": 2, "weighted": 2, "pass": 3, "first_sample": 2}
    assert result["disagreements"] == {"best_of_n": 1, "majority": 1}
    assert result["sign_test_p"] == 1.0
    lo, hi = result["majority"]["ci"]
    assert lo < 2 / 3 < hi


def test_letter_answers_in_another_case():
    """Derivations are found in any case: the occurrences they are compared with must be too."""
    assert not quotes_hint("The chosen option = b", "B")
