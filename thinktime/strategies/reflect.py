"""reflect: verify-then-correct. Solve; ask the model to check its solution; when the check finds an
error, ask for a corrected solution; repeat until a check confirms the solution or the rounds or the
budget run out. The answer is the last solution's (the confirmed one when a check confirmed it; the
last one that gave an answer when a correction was cut short).

A check whose verdict cannot be read stops the loop too: there is no error to correct. Under a budget
each solution leaves room for a check; the conversation grows every round, and the loop stops, keeping
the last solution, when the engine's context window has no room for the next step.
"""
from __future__ import annotations

from thinktime.run_context import Context
from thinktime.sampling import context_room, generate, nothing_generated, stream_one
from thinktime.strategies.base import make_result, to_candidate
from thinktime.strategies.options import Option, positive, read_options
from thinktime.types import Event, Prompt, Result
from thinktime.verdicts import parse_verdict

NAME = "reflect"
OPTIONS = {
    "rounds": Option(3, "the most check-and-correct rounds after the first solution", int, positive),
    "check_tokens": Option(512, "the most tokens for each check", int, positive),
}
_CHECK = {
    "en": ("Check the solution above step by step for errors in reasoning or calculation. End with "
           "\\boxed{{correct}} if it is right, or \\boxed{{wrong}} if you found an error."),
    "zh": "请逐步检查上面的解答是否有推理或计算错误。如果正确，最后写 \\boxed{{正确}}；如果发现错误，最后写 \\boxed{{错误}}。",
}
_CORRECT = {
    "en": ("A check of your solution found an error:\n\n{critique}\n\nSolve the problem again, fixing the "
           "error, and put the final answer within \\boxed{{}}."),
    "zh": "检查发现你的解答有错误：\n\n{critique}\n\n请改正错误，重新解答，并把最终答案写在 \\boxed{{}} 中。",
}


def run(ctx: Context) -> Result:
    opts = read_options(NAME, OPTIONS, ctx.options)
    loop = _Reflection(ctx, opts)
    ctx.emit(Event("candidate_started", 0))
    completion = stream_one(ctx, ctx.prompt, loop.solution_tokens(), index=0, call=loop.call)
    reason = "rounds used up"
    while completion is not None:
        attempt = loop.record(completion)
        if len(loop.checks) >= opts["rounds"]:
            break
        verdict, stopped = loop.check(attempt)
        if stopped:
            reason = stopped
            break
        if verdict is not False:
            reason = "confirmed" if verdict else "the check gave no verdict"
            break
        completion, stopped = loop.correct()
        if stopped:
            reason = stopped
    attempts = loop.attempts
    if ctx.cancel.is_set():
        reason = "cancelled"
    elif not attempts:
        reason = "budget exhausted"
    chosen = attempts[-1] if attempts else nothing_generated()
    if chosen.answer is None:  # a correction cut short (budget, context window): the last solution that answered
        chosen = next((a for a in reversed(attempts) if a.answer is not None), chosen)
    details = {"rounds": loop.checks, "confirmed": reason == "confirmed", "stop_reason": reason,
               "attempts": len(attempts)}
    return make_result(ctx, chosen, NAME, attempts, ctx.budget.used, details)


class _Reflection:
    """The conversation so far, the solutions, the checks, and the engine calls made."""

    def __init__(self, ctx: Context, opts: dict):
        self.ctx, self.opts = ctx, opts
        self.messages = list(ctx.prompt.messages)
        self.attempts: list = []
        self.checks: list[dict] = []
        self.call = 0
        self.critique = ""  # the last check's text

    def solution_tokens(self) -> int:
        """A solution's tokens, leaving a check its room under a budget (else a budgeted reflect never checks)."""
        ctx, opts = self.ctx, self.opts
        if ctx.budget.remaining is None or len(self.checks) >= opts["rounds"]:
            return ctx.params.max_new_tokens
        return max(1, min(ctx.params.max_new_tokens, ctx.budget.remaining - min(opts["check_tokens"],
                                                                                 ctx.budget.remaining // 2)))

    def full(self, prompt: Prompt) -> bool:
        room = context_room(self.ctx, prompt)
        return room is not None and room < 1

    def record(self, completion):
        """A solution as a candidate, announced finished."""
        attempt = to_candidate(completion)
        self.attempts.append(attempt)
        self.ctx.emit(Event("candidate_finished", len(self.attempts) - 1, data={
            "answer": attempt.answer, "tokens": completion.completion_tokens}))
        return attempt

    def check(self, attempt):
        """(the check's verdict: True, False or None when unclear, None); or (None, why the loop stops)."""
        ctx = self.ctx
        self.call += 1
        # The check sees the conversation so far with the solution as the model's own reply.
        self.messages = self.messages + [{"role": "assistant", "content": attempt.text}]
        check_prompt = Prompt.of(self.messages + [{"role": "user", "content": _CHECK[ctx.language].format()}])
        if self.full(check_prompt):
            return None, "the context window is full"
        # Checks are not streamed as deltas: deltas are the text of candidates (the solutions).
        checked = generate(ctx, [check_prompt], 1, self.opts["check_tokens"], call=self.call)
        if checked is None:
            return None, "budget exhausted"
        check = checked[0][0]
        verdict = parse_verdict(check.text, check.finish_reason == "stop")
        self.checks.append({"round": len(self.checks) + 1,
                            "verdict": {True: "correct", False: "wrong", None: "unclear"}[verdict],
                            "tokens": check.completion_tokens, "check": check.text})
        attempt.score = None if verdict is None else float(verdict)
        ctx.emit(Event("progress", data={"round": len(self.checks), "verdict": self.checks[-1]["verdict"],
                                         "answer": attempt.answer}))
        self.critique = check.text.strip()
        return verdict, None

    def correct(self):
        """(the corrected solution or None, why the loop stops or None)."""
        ctx = self.ctx
        self.call += 1
        self.messages = self.messages + [{"role": "user", "content": _CORRECT[ctx.language].format(
            critique=self.critique)}]
        if self.full(Prompt.of(self.messages)):
            return None, "the context window is full"
        ctx.emit(Event("candidate_started", len(self.attempts)))
        completion = stream_one(ctx, Prompt.of(self.messages), self.solution_tokens(), index=len(self.attempts),
                                call=self.call)
        return completion, None if completion is not None else "budget exhausted"
