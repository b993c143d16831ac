"""Two graders side by side: math-verify equivalence, and a simple normalised string/number match.

Both see the answer after `clean()`, which drops what is not part of the value: a \\boxed{} wrapper,
`x =`, units (cm, dollars, 元, 页, ...), and spells Chinese numerals as digits. The math grader then
asks thinktime.answers.equivalent (normalised string, number, then math-verify under a timeout);
the simple grader compares normalised strings and plain numbers (fractions and percentages
included) and nothing else. Where they disagree, the report lists the case.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from thinktime.answers import equivalent, normalize

# Bump when a verdict could change: runs record it in their configuration. 2: units, vectors, and a chain cut
# short votes its last-number guess in maj@k only when no chain gave a real answer (voting.vote_answers).
# 3: "the answer is 12, which is even" extracts 12 (answers.extract_answer ends it where a clause begins).
GRADER_VERSION = 3

_UNIT_WORDS = (
    "cm", "mm", "km", "m", "kg", "g", "mg", "ml", "l", "s", "sec", "seconds", "minutes", "min", "hours", "h",
    "days", "dollars", "dollar", "cents", "degrees", "units", "square units", "meters", "metres", "inches",
    "feet", "miles", "pages", "apples", "people", "students", "years", "yuan",
)
_ZH_UNITS = re.compile(r"(?<=[\d.%)}\]])\s*(?:平方千米|平方厘米|平方分米|平方米|立方厘米|立方分米|立方米|千克|公斤|公顷|克|吨|斤|千米|"
                       r"公里|米|分米|厘米|毫米|万元|元钱|元|角|分钟|小时|秒|天|年|岁|个|只|本|页|人|名|位|次|下|张|支|枝|"
                       r"辆|棵|块|条|件|朵|瓶|箱|袋|盒|盆|束|组|根|把|头|双|套|颗|粒|杯|间|台|份|道|倍|度|升|毫升)+$")
_ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_ZH_SMALL = {"十": 10, "百": 100, "千": 1000}
_ZH_BIG = {"万": 10_000, "亿": 100_000_000}


def chinese_number(text: str) -> int | None:
    """`三百零五` -> 305, `十二` -> 12, `两万` -> 20000; None when `text` is not a Chinese numeral."""
    if not text or any(c not in _ZH_DIGITS and c not in _ZH_SMALL and c not in _ZH_BIG for c in text):
        return None
    total, section, digit = 0, 0, None
    for c in text:
        if c in _ZH_DIGITS:
            digit = _ZH_DIGITS[c]
        elif c in _ZH_SMALL:
            section += (1 if digit is None else digit) * _ZH_SMALL[c]
            digit = None
        else:
            total += (section + (digit or 0)) * _ZH_BIG[c]
            section, digit = 0, None
    return total + section + (digit or 0)


def clean(answer: str | None) -> str | None:
    """The value an answer states, without wrappers, variable names or units."""
    if answer is None:
        return None
    s = answer.strip().strip("$").strip()
    m = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", s, re.S)
    if m:
        s = m.group(1).strip()
    s = re.sub(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?=\S)", "", s)  # x = 3 -> 3 (not for equations with x on the right)
    s = re.sub(r"^(?:答案?|答)\s*[:：是为]?\s*", "", s)
    # \text{ cm}, \text{dollars}: units in text wrappers after a value
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{\s*(?:" + "|".join(map(re.escape, _UNIT_WORDS)) + r")\s*\}\s*(\^\{?\d\}?)?$",
               "", s, flags=re.I)
    s = re.sub(r"(?<=\d)\s+(?:" + "|".join(map(re.escape, _UNIT_WORDS)) + r")\.?(\^\{?\d\}?)?$", "", s, flags=re.I)
    # any other word or two after a number, plain or in a text wrapper: 17 stickers, 18\text{ cookies}
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z]+(?:\s+[A-Za-z]+)?\s*\}$", "", s)
    s = re.sub(r"(?<=\d)\s+[A-Za-z]+(?:\s+[A-Za-z]+)?\.?$", "", s)
    s = re.sub(r"\\(?:text|mbox|mathrm)\s*\{\s*([\u4e00-\u9fff]+)\s*\}$", r"\1", s)  # 9\text{个} -> 9个
    s = _ZH_UNITS.sub("", s)
    s = s.rstrip("。.").strip()
    zh = chinese_number(s)
    if zh is not None:
        s = str(zh)
    return s


def _number(s: str) -> Fraction | None:
    """Plain numbers only: 12, -3.5, 1,234, 3/4, \\frac{3}{4}, 12% (as 12/100)."""
    s = normalize(s).replace(" ", "")
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    m = (re.fullmatch(r"(-?)\\frac(?:\{(\d+)\}|(\d))(?:\{(\d+)\}|(\d))", s)  # \frac{3}{4}, \frac34
         or re.fullmatch(r"(-?)(\d+)()/(\d+)()", s))
    try:
        if m:
            sign, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
            value = Fraction(int(sign + num), int(den))
        elif re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", s):
            value = Fraction(s)
        else:
            return None
    except (ZeroDivisionError, ValueError):
        return None
    return value / 100 if percent else value


def simple_equal(pred: str | None, gold: str | None) -> bool:
    """Normalised string match, else exact number match (a percentage also matches its number)."""
    a, b = clean(pred), clean(gold)
    if not a or not b:
        return False
    na, nb = normalize(a).replace(" ", ""), normalize(b).replace(" ", "")
    if na == nb:
        return True
    xa, xb = _number(a), _number(b)
    if xa is None or xb is None:
        return False
    if xa == xb:
        return True
    # "12" for a gold "12%" (or the reverse): the same percentage, written without the sign
    # (only when one of the two has the sign: 0.12% is not 12%)
    return (b.endswith("%") and not a.endswith("%") and xa == xb * 100) or \
        (a.endswith("%") and not b.endswith("%") and xb == xa * 100)


def math_equal(pred: str | None, gold: str | None, timeout: float = 5.0) -> bool:
    """math-verify equivalence (through thinktime.answers) of the cleaned answers."""
    a, b = clean(pred), clean(gold)
    if not a or not b:
        return False
    if equivalent(b, a, timeout):
        return True
    # math-verify reads "12%" as 0.12; CMATH-style golds accept the bare percentage number too
    xa, xb = _number(a), _number(b)
    return xa is not None and xb is not None and b.endswith("%") and xa == xb * 100


@dataclass(frozen=True)
class Verdict:
    correct: bool  # math-verify: the headline grader
    simple: bool  # the simple grader beside it

    @property
    def disagree(self) -> bool:
        return self.correct != self.simple


def grade(pred: str | None, gold: str, timeout: float = 5.0) -> Verdict:
    return Verdict(math_equal(pred, gold, timeout), simple_equal(pred, gold))
