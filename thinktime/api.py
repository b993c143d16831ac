"""Thinker: the one entry point that the CLI, the server, the UI and the eval harness share."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from thinktime import models, prompts
from thinktime.engines import Engine, create_engine, cuda_visible
from thinktime.errors import BadInputError
from thinktime.strategies import Budget, Context, check_options, get_strategy
from thinktime.strategies.base import make_result, to_candidate
from thinktime.strategies.cot import generate_batch
from thinktime.threads import iterate_in_thread
from thinktime.types import Event, Prompt, Result, SamplingParams

# A deep-thinking chain needs room: 8192 new tokens on a GPU (the tutorial's 512 cuts chains short).
# On a CPU the small embedded model rarely needs more than 1024, and each token costs real time.
DEFAULT_MAX_NEW_TOKENS = {"cuda": 8192, "cpu": 1024}
THINK_TAG_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class Thinker:
    """Ask questions of a model that thinks before it answers.

    >>> thinker = Thinker()                       # the embedded model on CPU, InternLM3 on a GPU
    >>> result = thinker.solve("5的十次方等于多少?")
    >>> result.answer, result.usage.completion_tokens
    """

    def __init__(self, model: str | None = None, *, engine: str | Engine = "auto",
                 device: str | None = None, dtype: str | None = None, lang: str = "auto",
                 system_prompt: str | None = None, think: bool = True, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 strategy: str = "cot", budget_tokens: int | None = None, options: dict | None = None,
                 trust_remote_code: bool = False, source: str | None = None, **engine_options):
        for name, value in (("max_new_tokens", max_new_tokens), ("budget_tokens", budget_tokens)):
            _check_count(name, value)
        if isinstance(engine, Engine):
            self.engine = engine
        else:
            if model is None and not engine.startswith("openai"):  # a server names its own model
                model = models.DEFAULT_GPU_MODEL if cuda_visible() else models.DEFAULT_CPU_MODEL
            self.engine = create_engine(engine, model, device=device, dtype=dtype,
                                        trust_remote_code=trust_remote_code, source=source, **engine_options)
        if lang not in ("auto", *prompts.LANGUAGES):
            raise BadInputError(f"unknown language {lang!r}", hint="use auto, en or zh")
        self.lang = lang
        self.system_prompt = system_prompt
        self.think = think
        self.max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS["cuda" if self.engine.device.startswith("cuda") else "cpu"]
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.strategy = strategy
        self.budget_tokens = budget_tokens
        # Settings for `strategy` (n, width, scorer, ...); a solve() that names another strategy starts from none.
        self.options = dict(options or {})
        get_strategy(strategy)  # fail now, not at the first question
        check_options(strategy, self.options)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    # --- building blocks ----------------------------------------------------------------------

    def messages(self, question: str, history: Sequence[dict] = ()) -> list[dict[str, str]]:
        """System prompt (deep-thinking, in the question's language) + history + the question."""
        question = _check_question(question)
        think_tags = bool(getattr(self.engine, "spec", None) and self.engine.spec.think_tags)
        system = self.system_prompt
        if system is None and self.think and not think_tags:
            lang = prompts.detect_language(question) if self.lang == "auto" else self.lang
            system = prompts.thinking_prompt(lang, self.max_new_tokens)
        if self.think and think_tags and self.system_prompt is None:
            # R1-style models are trained without a system prompt; the instruction goes in the turn.
            question = f"{question}\n{THINK_TAG_INSTRUCTION}"
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.extend(dict(m) for m in history if m.get("role") != "system")
        msgs.append({"role": "user", "content": question})
        return msgs

    def sampling(self, **overrides) -> SamplingParams:
        values = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                      seed=self.seed)
        values.update({k: v for k, v in overrides.items() if v is not None})
        _check_count("max_new_tokens", values["max_new_tokens"])
        if values["temperature"] < 0 or not 0 < values["top_p"] <= 1:
            raise BadInputError("temperature must be >= 0 and top_p in (0, 1]")
        return SamplingParams(**values)

    def context(self, question: str, *, history: Sequence[dict] = (), strategy: str | None = None,
                budget_tokens: int | None = None, emit=None, cancel: threading.Event | None = None,
                options: dict | None = None, **sampling) -> Context:
        _check_count("budget_tokens", budget_tokens)
        ctx = Context(question=question, prompt=Prompt.of(self.messages(question, history)), engine=self.engine,
                      params=self.sampling(**sampling), lang=None if self.lang == "auto" else self.lang,
                      budget=Budget(budget_tokens if budget_tokens is not None else self.budget_tokens),
                      options={**(self.options if (strategy or self.strategy) == self.strategy else {}),
                               **(options or {})})
        if emit is not None:
            ctx.emit = emit
        if cancel is not None:
            ctx.cancel = cancel
        ctx.options.setdefault("strategy", strategy or self.strategy)
        return ctx

    # --- the API ------------------------------------------------------------------------------

    def solve(self, question: str, **kwargs) -> Result:
        """Think about one question and return the checked answer with its reasoning and usage."""
        ctx = self.context(question, **kwargs)
        return get_strategy(ctx.options["strategy"])(ctx)

    def stream(self, question: str, **kwargs) -> Iterator[Event]:
        """Events while thinking ("delta" text as it is generated, progress), then one "result" event."""
        cancel = kwargs.pop("cancel", None) or threading.Event()
        ctx = self.context(question, cancel=cancel, **kwargs)
        strategy = get_strategy(ctx.options["strategy"])

        def work(emit) -> None:
            ctx.emit = emit
            emit(Event("result", result=strategy(ctx)))

        yield from iterate_in_thread(work, cancel, name="thinktime-strategy")

    def solve_many(self, questions: Sequence[str], **kwargs) -> list[Result]:
        """Many questions; single-chain questions go to the engine as one batch."""
        return list(self.solve_each(questions, **kwargs))

    def solve_each(self, questions: Sequence[str], **kwargs) -> Iterator[Result]:
        """solve_many's results as they come: a question at a time for multi-chain strategies (so a caller can
        show each, and keep what finished when stopped), all at once for a cot batch."""
        if (kwargs.get("strategy") or self.strategy) != "cot":
            for question in questions:
                yield self.solve(question, **kwargs)
            return
        yield from self._solve_batch(questions, **kwargs)

    def solve_allocated(self, questions: Sequence[str], total_tokens: int, *, first: int = 4, step: int = 4,
                        most: int = 16, **kwargs) -> list[Result]:
        """Self-consistency over many questions under one budget of `total_tokens` generated tokens: `first` chains
        each, then rounds of `step` to the questions whose vote is least settled, up to `most`."""
        from thinktime.strategies.allocation import solve_allocated

        _check_count("total_tokens", total_tokens)
        contexts = [self.context(q, strategy="self-consistency", **kwargs) for q in questions]
        return solve_allocated(contexts, total_tokens, first=first, step=step, most=most)

    def _solve_batch(self, questions: Sequence[str], **kwargs) -> list[Result]:
        contexts = [self.context(q, **kwargs) for q in questions]
        outputs = generate_batch(contexts)
        if outputs is None:
            return [self.solve(q, **kwargs) for q in questions]  # no room: each says so on its own
        results = []
        for ctx, (completion,) in zip(contexts, outputs):
            candidate = to_candidate(completion)
            results.append(make_result(ctx, candidate, "cot", [candidate], ctx.budget.used))
        return results


def _check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise BadInputError("the question is empty", hint="pass a question as text, e.g. thinktime solve \"1+1=?\"")
    return question.strip()


def _check_count(name: str, value) -> None:
    """A token count from the caller: a whole number of at least 1, or None for the default."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadInputError(f"{name} must be a whole number of at least 1, got {value!r}",
                            hint=f"--{name.replace('_', '-')} 256, or leave it out for the default")
