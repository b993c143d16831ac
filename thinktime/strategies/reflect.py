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
    lang = ctx.language
    messages = list(ctx.prompt.messages)
    attempts, checks = [], []
    call = 0

    def solution_tokens() -> int:
        """A solution's tokens, leaving a check its room under a budget (else a budgeted reflect never checks)."""
        if ctx.budget.remaining is None or len(checks) >= opts["rounds"]:
            return ctx.params.max_new_tokens
        return max(1, min(ctx.params.max_new_tokens, ctx.budget.remaining - min(opts["check_tokens"],
                                                                                 ctx.budget.remaining // 2)))

    def full(prompt: Prompt) -> bool:
        room = context_room(ctx, prompt)
        return room is not None and room < 1

    ctx.emit(Event("candidate_started", 0))
    completion = stream_one(ctx, ctx.prompt, solution_tokens(), index=0, call=call)
    reason = "rounds used up"
    while completion is not None:
        attempt = to_candidate(completion)
        attempts.append(attempt)
        ctx.emit(Event("candidate_finished", len(attempts) - 1, data={"answer": attempt.answer,
                                                                      "tokens": completion.completion_tokens}))
        if len(checks) >= opts["rounds"]:
            break
        call += 1
        # The check sees the conversation so far with the solution as the model's own reply.
        messages = messages + [{"role": "assistant", "content": attempt.text}]
        check_prompt = Prompt.of(messages + [{"role": "user", "content": _CHECK[lang].format()}])
        if full(check_prompt):
            reason = "the context window is full"
            break
        # Checks are not streamed as deltas: deltas are the text of candidates (the solutions).
        checked = generate(ctx, [check_prompt], 1, opts["check_tokens"], call=call)
        if checked is None:
            reason = "budget exhausted"
            break
        check = checked[0][0]
        verdict = parse_verdict(check.text, check.finish_reason == "stop")
        checks.append({"round": len(checks) + 1, "verdict": {True: "correct", False: "wrong", None: "unclear"}[verdict],
                       "tokens": check.completion_tokens, "check": check.text})
        attempt.score = None if verdict is None else float(verdict)
        ctx.emit(Event("progress", data={"round": len(checks), "verdict": checks[-1]["verdict"],
                                         "answer": attempt.answer}))
        if verdict is not False:
            reason = "confirmed" if verdict else "the check gave no verdict"
            break
        call += 1
        messages = messages + [{"role": "user", "content": _CORRECT[lang].format(critique=check.text.strip())}]
        if full(Prompt.of(messages)):
            reason = "the context window is full"
            break
        ctx.emit(Event("candidate_started", len(attempts)))
        completion = stream_one(ctx, Prompt.of(messages), solution_tokens(), index=len(attempts), call=call)
        if completion is None:
            reason = "budget exhausted"
    if ctx.cancel.is_set():
        reason = "cancelled"
    elif not attempts:
        reason = "budget exhausted"
    chosen = attempts[-1] if attempts else nothing_generated()
    if chosen.answer is None:  # a correction cut short (budget, context window): the last solution that answered
        chosen = next((a for a in reversed(attempts) if a.answer is not None), chosen)
    details = {"rounds": checks, "confirmed": reason == "confirmed", "stop_reason": reason,
               "attempts": len(attempts)}
    return make_result(ctx, chosen, NAME, attempts, ctx.budget.used, details)
