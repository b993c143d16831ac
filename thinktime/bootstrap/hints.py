"""Rationalisation (STaR): show the model the gold answer as a hint, keep only chains that derive it.

A chain written with the hint in view becomes training data for the question *without* the hint,
so it must read as if the model had found the answer itself. `quotes_hint` is the test, and it is
exact: a rationale quotes the hint when

1. it mentions the hint: the word "hint" (any case, also "hints", "hinted"), or "提示", or the
   hint's own wording "correct answer is" / "正确答案是" / "given answer"; or
2. it states the answer before deriving it: the first place where the gold answer appears (as a
   whole number: not a digit run inside a longer number, so "85" is not in "185" or "8.5") must be
   the result of a computation, that is right after "=", "equals", "is equal to" or "等于"
   (optionally with spaces, "$", "**" or "\\boxed{" in between); a rationale whose first mention
   of the answer comes any other way ("The answer is 85. First, 47 + 38 = 85"), or that never
   writes the answer as such a result, quotes the hint. When the gold answer also appears in the
   question (60 - 30 = 30), its earlier mentions may be copied operands, so only the existence of
   a derivation is required. For a numeric answer, a result counts only when its left side (back to
   the start of the clause: a line break, a sentence's end or a colon) holds an operation between two
   operands: "47 + 38 = 85", "47 plus 38 equals 85" and "47加38等于85" derive it; "the answer = 85",
   "**Answer** = 85" and "Step 2) the answer = 85" only assert it.

Non-numeric gold answers (\\frac{3}{4}, x^2) are matched literally after the same "=" rule.
"""
from __future__ import annotations

import re

HINTS = {
    "en": "{question}\n(Hint: the correct answer is {answer}. Work it out step by step on your own "
          "and do not mention this hint.)",
    "zh": "{question}\n（提示：正确答案是{answer}。请自己一步一步推导出来，不要提及这个提示。）",
}

_MENTIONS = re.compile(r"hint|提示|correct answer is|正确答案是|given answer|(?:we are|I was|as) told|"
                       r"need to show|should equal|expected answer", re.IGNORECASE)
_RESULT_LEAD = r"(?:=|\bequals?\b|\bis equal to\b|等于)(?:\s|\$|\*\*|\\boxed\{|\\\(|\\\[)*"


def with_hint(question: str, answer: str, lang: str = "en") -> str:
    """The question followed by the gold answer as a hint, in the question's language."""
    return HINTS[lang].format(question=question, answer=answer)


def _answer_pattern(gold: str) -> str:
    value = gold.strip().replace(",", "") if _is_numeric(gold) else gold.strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", value):
        # a whole number: no digit (or decimal part) glued on either side; thousands separators allowed
        digits = r",?".join(re.escape(c) for c in value.lstrip("-"))
        sign = "-" if value.startswith("-") else ""
        return rf"(?<![\d.,]){re.escape(sign)}{digits}(?!\d|[.,]\d)"
    return re.escape(value)


def mentions_hint(rationale: str) -> bool:
    """Rule 1: the rationale talks about the hint (or copies its wording)."""
    return _MENTIONS.search(rationale) is not None


_CLAUSE_START = re.compile(r"\n|[。！？；:：]|[.!?;](?=\s)")
# An operation between two operands: "47 + 38", "3 \\times 4", "(40 + 45)", "47 plus 38", "47加38", "\\frac{3}{4}".
_NUMERAL = r"(?:\d|[零一二三四五六七八九十百千万]+(?=[加减乘除]))"
_OPERATION = re.compile(
    rf"(?:\d|[)}}])\s*(?:[-−+*/×÷^·]|\\(?:times|cdot|div)|plus|minus|times|divided by|multiplied by|over)\s*[\d(\\]"
    rf"|{_NUMERAL}\s*(?:加上?|减去?|乘以?|除以?)\s*[\d零一二三四五六七八九十百千万]|\\(?:frac|sqrt|dfrac)\b"
    rf"|\b(?:sum|product|difference|quotient|total) (?:of|between)\b.+\band\b", re.IGNORECASE)


def _is_numeric(gold: str) -> bool:
    return re.fullmatch(r"-?[\d,]+(?:\.\d+)?", gold.strip()) is not None


def _computed(rationale: str, lead_start: int) -> bool:
    """The clause left of a result's "=" holds something computed: a number or an operator."""
    window = max(0, lead_start - 200)
    starts = [window] + [m.end() for m in _CLAUSE_START.finditer(rationale, window, lead_start)]
    left = ""
    while starts and not left.strip():  # "47 + 38\n= 85": an empty clause reads on from the one before
        left = rationale[starts.pop():lead_start]
    left = left.replace("**", "").replace("__", "")  # Markdown emphasis is not arithmetic
    return _OPERATION.search(left) is not None


def _derivations(rationale: str, gold: str) -> list[re.Match]:
    """Every place the rationale writes the gold answer as a computation's result ("47 + 38 = 85")."""
    found = list(re.finditer(rf"{_RESULT_LEAD}(?P<answer>{_answer_pattern(gold)})", rationale, re.IGNORECASE))
    if _is_numeric(gold):  # letters and expressions have no arithmetic to look for on the left
        found = [m for m in found if _computed(rationale, m.start())]
    return found


def first_derivation(rationale: str, gold: str) -> re.Match | None:
    """Where the rationale first writes the gold answer as a computation's result ("= 85")."""
    found = _derivations(rationale, gold)
    return found[0] if found else None


def trim_after_derivation(rationale: str, gold: str) -> str | None:
    """The rationale up to the end of the sentence (or line) that first derives the gold answer;
    None when it never derives it."""
    m = first_derivation(rationale, gold)
    if m is None:
        return None
    end = re.search(r"\.(?=\s|$)|\n|$", rationale[m.end():])
    cut = m.end() + end.start() + (1 if end.group(0) == "." else 0)
    return rationale[:cut].rstrip()


def derives_answer(rationale: str, gold: str, question: str = "") -> bool:
    """Rule 2 passes: the answer appears first as a computation's result (see the module docstring)."""
    pattern = _answer_pattern(gold)
    occurrences = [m.start() for m in re.finditer(pattern, rationale, re.IGNORECASE)]  # as derivations are found
    derivations = [m.start("answer") for m in _derivations(rationale, gold)]
    if not derivations:
        return False
    if question and re.search(pattern, question):
        return True  # earlier mentions may be operands copied from the question
    return occurrences[0] == derivations[0]


def quotes_hint(rationale: str, gold: str, question: str = "") -> bool:
    """True when a rationale written with the hint in view leans on it (rule 1 or 2 above)."""
    return mentions_hint(rationale) or not derives_answer(rationale, gold, question)
