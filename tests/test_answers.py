"""Answer extraction, normalisation and equivalence: pure functions, exact cases."""
from __future__ import annotations

import threading

import pytest

from thinktime.answers import equivalent, extract_answer, find_boxed, math_equal, normalize


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
    ("first \\boxed{1} then corrected \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("$\\boxed{ 9765625 }$", "9765625"),
    ("所以5的十次方等于 \\boxed{9765625}。", "9765625"),
    ("answer: \\boxed 5", "5"),
    ("a set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("interval \\boxed{(1, 2]}", "(1, 2]"),
])
def test_boxed_extraction(text, expected):
    extraction = extract_answer(text)
    assert extraction.value == expected
    assert extraction.method == "boxed"
    assert not extraction.is_fallback


def test_unclosed_box_is_ignored_and_falls_back():
    extraction = extract_answer("the result is 12. \\boxed{13")
    assert extraction.method == "last-number"
    assert extraction.value == "13"


@pytest.mark.parametrize("text, value, method", [
    ("We compute carefully. The answer is 17.", "17", "answer-is"),
    ("So the answer is 12, which is even.", "12", "answer-is"),
    ("The answer is 4, but in base 2 it is 100.", "4", "answer-is"),
    ("The answer is 1, 2, 3.", "1, 2, 3", "answer-is"),  # a list is not a clause
    ("So, the answer is indeed 12.", "12", "answer-is"),  # a filler word is not part of the answer
    ("Final answer: $\\frac{3}{4}$\n", "\\frac{3}{4}", "answer-is"),
    ("所以答案是 24。", "24", "answer-is"),
    ("答案是：5", "5", "answer-is"),  # 是 and a colon together
    ("所以，答案为：12个。", "12个", "answer-is"),
    ("答案是：$\\frac{3}{4}$", "\\frac{3}{4}", "answer-is"),
    ("There are 3 apples and 4 pears, 7 in all", "7", "last-number"),
    ("a total of 1,234 items", "1234", "last-number"),
    ("no digits here at all", None, None),
])
def test_fallbacks_are_marked(text, value, method):
    extraction = extract_answer(text)
    assert extraction.value == value
    assert extraction.method == method
    assert extraction.is_fallback == (method is not None)


def test_find_boxed_lists_every_box_in_order():
    assert [c for _, c in find_boxed("\\boxed{a} x \\fbox{b} \\boxed{c}")] == ["a", "b", "c"]


@pytest.mark.parametrize("raw, expected", [
    ("$9,765,625$", "9765625"),
    ("\\text{5 apples}", "5 apples"),
    ("2.50", "2.5"),
    ("3.0", "3"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("90^\\circ", "90"),
    ("50\\%", "50%"),
    ("42.", "42"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize("a, b", [
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "0.5"),
    ("9765625", "9,765,625"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("(1,2]", "(1, 2]"),
    ("x^2+2x+1", "(x+1)^2"),
    ("11", "10 + 1"),
    ("(3*4)/2", "6.0"),
])
def test_equivalent(a, b):
    assert equivalent(a, b)


@pytest.mark.parametrize("a, b", [("1", "2"), ("\\frac{1}{3}", "0.33"), ("(1,2]", "[1,2]"), (None, "1"), ("", "")])
def test_not_equivalent(a, b):
    assert not equivalent(a, b)


def test_plain_arithmetic_is_compared_without_math_verify(monkeypatch):
    from thinktime import answers

    def refuse(a, b, timeout=5.0):
        raise AssertionError(f"math-verify called for {a!r} and {b!r}")

    monkeypatch.setattr(answers, "math_equal", refuse)
    assert equivalent("10 + 1", "11") and not equivalent("20", "10 + 1") and equivalent("-(2 - 5)", "3")
    assert answers._as_number("2**3") is None and answers._as_number("12 (apples)") is None
    assert answers._as_number("1/0") is None  # not a number, and not an error


def test_math_verify_is_asked_once_per_pair(monkeypatch):
    """Voting compares the same answers round after round: a pair's verdict is kept, not parsed again."""
    from thinktime import answers

    answers._math_equal.cache_clear()
    real, calls = answers._verify_in_this_thread, []
    monkeypatch.setattr(answers, "_verify_in_this_thread", lambda a, b, t: calls.append((a, b)) or real(a, b, t))
    assert math_equal("\\frac{2}{4}", "\\frac{1}{2}") and math_equal("\\frac{2}{4}", "\\frac{1}{2}")
    assert not math_equal("\\sqrt{2}", "1.5") and not math_equal("\\sqrt{2}", "1.5")
    assert calls == [("\\frac{2}{4}", "\\frac{1}{2}"), ("\\sqrt{2}", "1.5")]
    answers._math_equal.cache_clear()


def test_math_equal_works_off_the_main_thread():
    """math-verify's signal timeouts fail off the main thread; we run it in a child process there."""
    from thinktime import answers

    answers._math_equal.cache_clear()  # verdicts kept from the main thread would skip the worker
    results = {}

    def worker():
        results["same"] = math_equal("\\frac{2}{4}", "\\frac{1}{2}")
        results["different"] = math_equal("\\sqrt{2}", "1.5")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=120)
    assert results == {"same": True, "different": False}
