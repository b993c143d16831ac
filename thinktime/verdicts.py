"""Reading a yes/no verdict out of a judgement: the self-judge scorer's and the reflect strategy's checks."""
from __future__ import annotations

import re

from thinktime.answers import find_boxed

_YES = {"yes", "correct", "right", "true", "是", "正确", "对"}
_NO = {"no", "incorrect", "wrong", "false", "否", "错误", "错", "不正确"}
_WORD = re.compile(r"\b(yes|no|correct|incorrect|wrong)\b|(不正确|正确|错误)", re.IGNORECASE)


def parse_verdict(text: str, finished: bool = True) -> bool | None:
    """True for a yes/correct verdict, False for no/wrong, None when the text gives none.

    The last \\boxed{} verdict wins; without one, the last verdict word in the text, but only in a
    judgement that finished: one cut by its token limit stopped mid-thought ("let me check whether the
    first step is correct"), and only a boxed verdict in it is a verdict.
    """
    for _, content in reversed(find_boxed(text)):
        word = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", content).strip().strip(".。").lower()
        if word in _YES:
            return True
        if word in _NO:
            return False
    matches = list(_WORD.finditer(text))
    if not matches or not finished:
        return None
    last = matches[-1]
    # A negated verdict word ("not correct", "no errors", "没有错误", "并不正确") reads the other way, or not at
    # all ("no mistakes; right"): without a boxed verdict such a text gives none, rather than a guess.
    before = text[max(0, last.start() - 24):last.start()].lower()
    word = (last.group(1) or last.group(2)).lower()
    if word in ("yes", "no") and "?" in text[max(0, last.start() - 40):last.start()]:
        return None  # "Is the solution wrong? No.": which way it reads depends on the question
    if re.search(r"\b(?:not|no|never|n't|without|nothing|none|neither|nor)\b[\w\s,;]*$|n't\s*$|[没不无未]", before) or \
            re.search(r"\b(?:no|not)\s+(?:error|errors|mistake|mistakes|issue|issues|problem|problems)\b|没有错|无误",
                      text[max(0, last.start() - 40):], re.IGNORECASE):
        return None
    return word in _YES
