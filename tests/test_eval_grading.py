"""The two graders, the statistics and the option parsing of the eval harness (no model needed)."""
from __future__ import annotations

import math

import pytest

from thinktime.errors import BadInputError
from thinktime.evaluation.grading import chinese_number, clean, grade, math_equal, simple_equal
from thinktime.evaluation.metrics import best_within_budget, pass_at_k, wilson
from thinktime.evaluation.runner import parse_ns, problem_seed

# (prediction, gold, math-verify verdict, simple verdict)
CASES = [
    # fractions
    ("\\frac{1}{2}", "1/2", True, True),
    ("\\dfrac{3}{4}", "0.75", True, True),
    ("\\frac34", "3/4", True, True),
    ("2/6", "1/3", True, True),
    ("-\\frac{3}{4}", "-0.75", True, True),
    ("\\frac{1}{3}", "0.333", False, False),
    # decimals and thousands separators
    ("3.0", "3", True, True),
    ("2.50", "2.5", True, True),
    ("1,000", "1000", True, True),
    ("0.1", "0.10", True, True),
    ("4", "5", False, False),
    # percentages (CMATH golds such as "12%")
    ("12\\%", "12%", True, True),
    ("12", "12%", True, True),
    ("0.12", "12%", True, True),
    ("13", "12%", False, False),
    # units
    ("5\\text{ cm}", "5", True, True),
    ("5 cm", "5", True, True),
    ("\\$18", "18", True, True),
    ("18 dollars", "18", True, True),
    ("90^\\circ", "90", True, True),
    # intervals
    ("[1,3)", "[1, 3)", True, True),
    ("(-\\infty, 2]", "(-\\infty,2]", True, True),
    ("[1,3)", "(1,3)", False, False),
    ("(1,3) \\cup (4, 5)", "(1,3)\\cup(4,5)", True, True),
    # LaTeX variants: math-verify sees through them, the simple grader does not (a listed disagreement)
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True, False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True, True),
    ("x = 3", "3", True, True),
    ("\\boxed{7}", "7", True, True),
    ("\\text{(B)}", "B", True, False),
    ("\\pi", "3.14159", False, False),
    # Chinese answers
    ("9页", "9", True, True),
    ("24元", "24", True, True),
    ("九", "9", True, True),
    ("三百零五", "305", True, True),
    ("答案是12", "12", True, True),
    ("68下", "68", True, True),  # times: CMATH asks in it
    ("68和", "68", False, False),  # a word that is not a measure word is not silently dropped
    ("9\\text{个}", "9", True, True),  # a Chinese unit in a text wrapper
    ("9\\text{ 元}", "9", True, True),
    ("5盆", "5", True, True),
    ("3万元", "3", True, True),  # the question asks in 万元
    # count nouns after a number, plain or wrapped (GSM8K, arith:5)
    ("17 stickers", "17", True, True),
    ("17\\text{ stickers}", "17", True, True),
    ("3 or 4", "4", False, False),
    # the degree sign, as models write it
    ("90°", "90^\\circ", True, True),
    ("40°", "40", True, True),
    # vectors: a row break is not an escaped space (a wrong vector, or its first entry, passed)
    ("-2", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", False, False),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ 7 \\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", False, False),
    ("\\begin{pmatrix}-2\\\\-14\\\\-7\\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", True, True),
    # thousands separators written ",\\! " (MATH-500)
    ("11111111100", "11,\\! 111,\\! 111,\\! 100", True, True),
    ("11111111101", "11111111100", False, False),  # integers compare exactly
    ("0.12%", "12%", False, False),  # a percentage is not its hundredth
    # no answer
    (None, "5", False, False),
    ("", "5", False, False),
]


@pytest.mark.parametrize("pred,gold,math_ok,simple_ok", CASES)
def test_graders(pred, gold, math_ok, simple_ok):
    verdict = grade(pred, gold)
    assert (verdict.correct, verdict.simple) == (math_ok, simple_ok)
    assert verdict.disagree == (math_ok != simple_ok)


def test_graders_compare_both_ways():
    assert math_equal("0.5", "\\frac12") and math_equal("\\frac12", "0.5")
    assert simple_equal("12%", "0.12") and simple_equal("0.12", "12%")


def test_chinese_numerals():
    assert chinese_number("十二") == 12
    assert chinese_number("两万零三") == 20003
    assert chinese_number("一百零五") == 105
    assert chinese_number("12") is None
    assert clean("$\\boxed{42}$") == "42"


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] > 0.2  # never a zero-width interval
    assert wilson(0, 0) == (0.0, 0.0)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(16, 4, 4) == pytest.approx(1 - math.comb(12, 4) / math.comb(16, 4))
    assert pass_at_k(5, 3, 3) == 1.0  # fewer wrong samples than k: always a hit
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


def test_budget_matching():
    points = [(100.0, 0.2), (400.0, 0.35), (1600.0, 0.3)]
    assert best_within_budget(points, 50) is None
    assert best_within_budget(points, 400) == 0.35
    assert best_within_budget(points, 5000) == 0.35


def test_n_lists_and_seeds():
    assert parse_ns("16,1,4,4") == [1, 4, 16]
    for bad in ("", "0", "a,b", "1,-2"):
        with pytest.raises(BadInputError):
            parse_ns(bad)
    assert problem_seed(0, "a") == problem_seed(0, "a") != problem_seed(1, "a")
