"""A value source for tree search: rollouts to a final answer, graded against the gold (rStar-Math's
terminal-guided annotation).

A chain's score is the share of its `rollouts` completions (continued from the chain through `Prompt.prefix`,
all chains of a call in one engine call) whose answer grades correct, as `thinktime eval` grades (answer
extraction, then math-verify); a chain that has ended (its last step boxes an answer, or the model ended its
turn there) is graded as it is. The mcts
strategy backs each score up the path, so a node's mean value v is the share of correct outcomes below it,
and Q = 2v - 1 is the mean of rStar-Math's +1/-1 rewards, in [-1, 1].
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from thinktime.answers import find_boxed
from thinktime.evaluation.grading import grade
from thinktime.run_context import Context
from thinktime.sampling import generate, sampling_temperature
from thinktime.scorers.base import Scorer
from thinktime.strategies.base import to_candidate
from thinktime.strategies.steps import DEFAULT_DELIMITER, continuation
from thinktime.types import Completion


@dataclass
class Outcome:
    """One graded end of a chain: its rollout ("" where the chain itself ends in an answer)."""

    rollout: str
    answer: str | None
    correct: bool
    finish: str  # the rollout's finish reason: stop, length, cancelled
    tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def chain_text(steps: Sequence[str], rollout: str, delimiter: str = DEFAULT_DELIMITER) -> str:
    """The whole chain: the steps, then the rollout that finishes it."""
    return delimiter.join([*steps, rollout] if rollout.strip() else steps)


class RolloutValue(Scorer):
    """Scores chains by rolling them out to an answer and grading it against `gold`; keeps every outcome,
    by chain (a tuple of its steps), in the order the chains were scored."""

    name = "rollout"
    per_step = False

    def __init__(self, ctx: Context, gold: str, *, rollouts: int = 1, max_tokens: int = 256,
                 delimiter: str = DEFAULT_DELIMITER):
        self.ctx, self.gold, self.rollouts, self.max_tokens, self.delimiter = ctx, gold, rollouts, max_tokens, delimiter
        self.outcomes: dict[tuple[str, ...], list[list[Outcome]]] = {}
        self.calls = 0
        self.cut = False  # the budget or a cancel left some chain without its rollouts (scored a neutral 0.5)

    def score(self, question: str, chains: Sequence[Sequence[str]]) -> list[list[float]]:
        return self.score_ended(question, chains, [False] * len(chains))

    def score_ended(self, question: str, chains: Sequence[Sequence[str]], ended: Sequence[bool]) -> list[list[float]]:
        """Ended chains (and any whose last step boxes an answer) are graded as they are; the rest rolled out."""
        chains = [tuple(s for s in steps if s.strip()) for steps in chains]
        done = [end or (bool(steps) and bool(find_boxed(steps[-1]))) for steps, end in zip(chains, ended)]
        open_chains = [steps for steps, end in zip(chains, done) if not end]
        rolled = iter(self._roll_out(open_chains) if open_chains else [])
        scores = []
        for steps, end in zip(chains, done):
            outcomes = [self._grade(steps, "", "stop", 0)] if end else next(rolled)
            if outcomes is None:
                scores.append([0.5])
                continue
            self.outcomes.setdefault(steps, []).append(outcomes)
            scores.append([sum(o.correct for o in outcomes) / len(outcomes)])
        return scores

    def _roll_out(self, chains: list[tuple[str, ...]]) -> list[list[Outcome] | None]:
        prompts = [continuation(self.ctx.prompt, list(steps), self.delimiter) for steps in chains]
        self.calls += 1  # rollout calls get their own seeds, apart from the calls that sample steps
        out = generate(self.ctx, prompts, self.rollouts, self.max_tokens, call=200_000 + self.calls,
                       temperature=sampling_temperature(self.ctx))
        if out is None:
            self.cut = True
            return [None] * len(chains)
        return [[self._grade(steps, c.text, c.finish_reason, c.completion_tokens) for c in completions]
                for steps, completions in zip(chains, out)]

    def _grade(self, steps: Sequence[str], rollout: str, finish: str, tokens: int) -> Outcome:
        candidate = to_candidate(Completion(chain_text(steps, rollout, self.delimiter), finish, 0, tokens))
        return Outcome(rollout, candidate.answer, grade(candidate.answer, self.gold).correct, finish, tokens)
