"""Split a chain into reasoning and answer *while it is being generated*.

`thinktime.reasoning.split_reasoning` splits a finished chain. A stream has to decide as the text
arrives, and the two kinds of models (DESIGN.md) allow different honesty:

* Models that think in tags: everything up to `</think>` is reasoning and goes out as it comes;
  everything after it is the answer and goes out as it comes. Only a few characters that might
  begin `</think>` are held back, never more than the tag's length.
* Models that think in plain text and box the answer: nobody can know where the closing statement
  begins until the chain has ended (a later paragraph may box a different answer). So the whole
  chain streams live as reasoning, token by token, and when it ends the closing statement (the
  paragraph holding the last \\boxed{}, exactly as `split_reasoning` finds it) is sent as the
  answer. A client that shows both sees the closing statement twice: once as the end of the
  thinking, once as the answer. Holding text back instead would turn a live stream into one
  delayed paragraph at a time.

Both the server (`delta.reasoning_content` / `delta.content`) and the web UI (thinking panel /
answer) use this one class.
"""
from __future__ import annotations

from thinktime.reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning


class ReasoningStream:
    """Feed text deltas; get back (reasoning, answer) pieces to send now."""

    def __init__(self, think_tags: bool = False):
        self.think_tags = think_tags  # the model is known to close its thinking with </think>
        self.text = ""  # everything fed so far
        self.mode = "start"  # start -> reasoning -> answer
        self.pending = ""  # held back: may be the start of a tag
        self.saw_open = False
        self.reasoning_sent = ""
        self.answer_sent = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        self.pending += delta
        reasoning, answer = "", ""
        if self.mode == "start":
            stripped = self.pending.lstrip()
            if THINK_OPEN.startswith(stripped) and len(stripped) < len(THINK_OPEN):
                return "", ""  # could still be "<think>": wait for more
            if stripped.startswith(THINK_OPEN):
                self.saw_open = True
                self.pending = stripped[len(THINK_OPEN):].lstrip("\n")
            self.mode = "reasoning"
        if self.mode == "reasoning":
            at = self.pending.find(THINK_CLOSE)
            if at >= 0:
                reasoning = self.pending[:at]
                self.pending = self.pending[at + len(THINK_CLOSE):].lstrip()
                self.mode = "answer"
            else:
                keep = _partial_suffix(self.pending, THINK_CLOSE)
                reasoning, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        if self.mode == "answer":
            answer, self.pending = (self.pending.lstrip() if not self.answer_sent else self.pending), ""
        self.reasoning_sent += reasoning
        self.answer_sent += answer
        return reasoning, answer

    def finish(self, finish_reason: str = "stop") -> tuple[str, str]:
        """What is left to send once the chain has ended."""
        reasoning, answer = "", ""
        if self.mode == "answer":
            answer = self.pending
        else:
            reasoning = self.pending  # an unfinished "<thi" or "</thi" is just text
            if not (self.think_tags or self.saw_open):
                # Plain-text thinker: the closing statement is only known now.
                answer = reply_split(self.text, finish_reason, False)[1]
        self.pending = ""
        self.reasoning_sent += reasoning
        self.answer_sent += answer
        return reasoning, answer


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def reply_split(text: str, finish_reason: str, think_tags: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a finished chain, for a chat reply.

    `split_reasoning` decides; one addition for chat: a plain-text model that ended its turn by
    itself without boxing anything ("Hello! How can I help?") still answered, so its closing
    paragraph is the answer. A chain cut by the length limit never reached its answer.
    """
    split = split_reasoning(text)
    if split.answer or think_tags or THINK_CLOSE in text or THINK_OPEN in text or finish_reason != "stop":
        return split.reasoning, split.answer
    body = text.strip()
    cut = body.rfind("\n\n")
    return (body[:cut].strip(), body[cut:].strip()) if cut >= 0 else ("", body)


class CandidateView:
    """Shows a multi-chain strategy as one reasoning stream.

    Chains that stream: the lead chain live, the others (buffered meanwhile) in turn after it, each
    under a header. Chains a strategy draws in one batched call (no deltas): a line with the answer
    as each finishes, the votes as they change, and at the end the chosen chain's reasoning.
    """

    def __init__(self):
        self.lead: int | None = None
        self.shown: set[int] = set()
        self.finished: set[int] = set()
        self.buffers: dict[int, str] = {}
        self.streamed = False
        self.started = False

    def _sep(self) -> str:
        out = "" if not self.started else "\n\n"
        self.started = True
        return out

    def _show(self, index: int) -> str:
        text = self._sep() + f"── candidate {index + 1} ──\n" + self.buffers.pop(index, "")
        self.shown.add(index)
        self.lead = index
        return text

    def delta(self, index: int, text: str) -> str:
        self.streamed = True
        if self.lead is None or (self.lead in self.finished and index not in self.shown):
            return self._show(index) + text
        if index == self.lead:
            return text
        self.buffers[index] = self.buffers.get(index, "") + text
        return ""

    def finish(self, index: int, data: dict | None = None) -> str:
        self.finished.add(index)
        if index not in self.shown and index not in self.buffers:  # drawn without streaming
            data = data if isinstance(data, dict) else {}
            tokens = f" · {data['tokens']} tokens" if "tokens" in data else ""
            return self._sep() + f"── candidate {index + 1}: answer {data.get('answer')}{tokens} ──"
        out = ""
        while self.lead in self.finished:
            waiting = sorted(i for i in self.buffers if i not in self.shown)
            if not waiting:
                break
            out += self._show(waiting[0])
        return out

    def progress(self, data: dict) -> str:
        votes = data.get("votes") if isinstance(data, dict) else None
        if isinstance(votes, dict):
            votes = [{"answer": a, "votes": v} for a, v in votes.items()]
        if not isinstance(votes, list) or not votes:
            return ""
        parts = [f"{v.get('answer')} ×{v.get('votes')}" for v in votes if isinstance(v, dict)]
        return self._sep() + "votes so far: " + ", ".join(parts) if parts else ""

    def flush(self, result=None) -> str:
        out = ""
        for index in sorted(self.buffers):
            out += self._show(index) if index not in self.shown else self.buffers.pop(index)
        if result is not None and not self.streamed and (result.reasoning or "").strip():
            out += self._sep() + "── the chosen chain ──\n" + result.reasoning
        return out
