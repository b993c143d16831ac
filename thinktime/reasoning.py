"""Split a completion into its reasoning (the chain of thought) and its answer (the closing statement).

Two kinds of models think aloud (see DESIGN.md): those that wrap thinking in <think>...</think>
(DeepSeek-R1 distills, Qwen3) and those that think in plain text and box the answer (InternLM3).
With tags, the reasoning is what the tags hold; without, the answer is the closing paragraph(s)
that hold the last \\boxed{}, and the reasoning is everything before it.
"""
from __future__ import annotations

from dataclasses import dataclass

from thinktime.answers import find_boxed

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str
    answer: str


def split_reasoning(text: str) -> Split:
    if THINK_CLOSE in text:
        # The opening tag may live in the prompt (chat templates that open <think> themselves).
        head, _, tail = text.rpartition(THINK_CLOSE)
        reasoning = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
        return Split(reasoning.strip(), tail.strip())
    if THINK_OPEN in text:  # thinking never closed (cut by the length limit): all reasoning
        return Split(text.split(THINK_OPEN, 1)[1].strip(), "")
    boxes = find_boxed(text)
    if not boxes:
        return Split(text.strip(), "")
    start = boxes[-1][0]
    # The answer statement starts at the paragraph that holds the last box.
    para = text.rfind("\n\n", 0, start)
    cut = 0 if para < 0 else para
    return Split(text[:cut].strip(), text[cut:].strip())
