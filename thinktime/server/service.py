"""The chat service behind the routes: a request checked and turned into a strategy run (its context, options and
limits), a scheduler job, and the response body; the routes in app.py only speak HTTP."""
from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from thinktime.api import Thinker
from thinktime.errors import ThinktimeError
from thinktime.server.protocol import REASONING_EFFORT, APIError, ChatRequest
from thinktime.server.scheduler import Job, Scheduler
from thinktime.server.streaming import reply_split
from thinktime.strategies import SCALE_OPTION, STRATEGIES, get_strategy, resolve_strategy
from thinktime.strategies.cot import chain_params
from thinktime.types import Event


@dataclass
class ServerConfig:
    api_key: str | None = None
    served_names: tuple[str, ...] = ()
    max_queue: int = 64
    max_batch: int | None = None
    batch_wait: float = 0.02
    request_timeout: float = 600.0
    default_max_tokens: int | None = None
    max_tokens_limit: int | None = None
    max_n: int = 16
    max_body_bytes: int = 4 * 1024 * 1024


# Strategy options that set how many chains run side by side in one engine call: capped by --max-n, as
# the request's n is, so that one request cannot take the machine's memory (rows x positions of KV cache).
PARALLEL_OPTIONS = ("n", "width", "expansions", "judges")
# Strategy options that count tokens: each is capped by --max-tokens-limit, as the request's max_tokens is.
TOKEN_OPTIONS = ("max_tokens", "min_tokens", "step_tokens", "check_tokens", "judge_tokens", "answer_tokens")


def parse_model(model: str, names: tuple[str, ...]) -> tuple[str, str | None, int | None]:
    """'base[:strategy[-N]]' -> (base, strategy, N); N sets the strategy's size (SCALE_OPTION: self-consistency's and
    best-of-n's n, beam's width, ...); raises a 404 for anything unknown."""
    if model in names:
        base, suffix = model, ""
    else:  # the longest served name before a colon: a served name may hold colons itself ("llama3:8b")
        base = max((n for n in names if model.startswith(n + ":")), key=len, default=model)
        suffix = model[len(base) + 1:] if base != model else ""
    if base not in names:
        raise APIError(404, f"The model '{model}' does not exist. This server serves: {', '.join(names)}",
                       type="invalid_request_error", param="model", code="model_not_found")
    if not suffix:
        return base, None, None
    strategy = resolve_strategy(suffix)
    if strategy is not None:
        return base, strategy, None
    match = re.fullmatch(r"(.+?)-(\d+)", suffix)
    if match and resolve_strategy(match.group(1)) is not None and not 1 <= int(match.group(2)) <= 9999:
        raise APIError(400, f"the size in '{model}' must be between 1 and 9999 (and within this server's --max-n)",
                       param="model", code="invalid_value")
    if match and (strategy := resolve_strategy(match.group(1))) is not None:
        if strategy not in SCALE_OPTION:
            raise APIError(404, f"The model '{model}' does not exist: strategy '{strategy}' takes no size after "
                                f"the name (for several chains of {strategy}, send the request's n)",
                           param="model", code="model_not_found")
        return base, strategy, int(match.group(2))
    raise APIError(404, f"The model '{model}' does not exist: unknown strategy '{suffix}' "
                        f"(strategies: {', '.join(STRATEGIES)})", param="model", code="model_not_found")


class ChatService:
    """Turns validated requests into jobs on the scheduler, and their results into OpenAI objects."""

    def __init__(self, thinker: Thinker, config: ServerConfig):
        self.thinker = thinker
        self.engine = thinker.engine
        self.config = config
        self.names = config.served_names or (thinker.model_name,)
        self.scheduler = Scheduler(self.engine, max_queue=config.max_queue, max_batch=config.max_batch,
                                   batch_wait=config.batch_wait)
        self.context_length = self.engine.context_length
        self.max_tokens_limit = config.max_tokens_limit or self.context_length or 32768
        self.default_max_tokens = min(config.default_max_tokens or thinker.max_new_tokens, self.max_tokens_limit)
        spec = getattr(self.engine, "spec", None)
        self.think_tags = bool(spec and spec.think_tags)
        # Counting prompt tokens on the event loop's side must not share the engine's tokenizer,
        # whose padding state the worker changes while it generates.
        tokenizer = getattr(self.engine, "tokenizer", None)
        self._tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._count_lock = threading.Lock()

    # --- building a run ------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        with self._count_lock:
            if self._tokenizer is not None:
                return len(self._tokenizer(text, add_special_tokens=False).input_ids)
            return self.engine.count_tokens(text)

    def reasoning_tokens(self, usage: dict, contents: list[str]) -> int:
        """Completion tokens that were thinking: all but the answers' own (every chain of a multi-chain strategy
        but the chosen closing statement is reasoning)."""
        return max(0, usage["completion_tokens"] - sum(self.count_tokens(c) for c in contents if c))

    def prepare(self, req: ChatRequest):
        """(base model, strategy, strategy context, prompt tokens) of a request, every setting checked."""
        base, strategy, suffix_n = parse_model(req.model, self.names)
        strategy = self._strategy(req, strategy)
        extra = self._strategy_options(req, strategy, suffix_n)
        max_tokens = self._max_tokens(req)
        self._check_n(req, strategy)
        stop = req.stop_strings()
        logprobs = self._logprobs(req, strategy)
        question, history, system = self._conversation(req)
        options = req.thinktime
        try:
            ctx = self._thinker_for(req, system).context(
                question, history=history, strategy=strategy,
                budget_tokens=options.budget_tokens if options else None,
                options=extra,
                max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                stop=stop or None, logprobs=logprobs)
        except ThinktimeError as exc:
            raise APIError(400, exc.message, param="messages", code="invalid_value") from None
        prompt_tokens = self._prompt_tokens(ctx)
        _check_options(strategy, ctx.options)  # cot takes none: any option is refused, not ignored
        return base, strategy, ctx, prompt_tokens

    def _strategy(self, req: ChatRequest, from_model: str | None) -> str:
        """The strategy: thinktime.strategy, else the model name's suffix, else the server's."""
        options = req.thinktime
        strategy = from_model
        if options and options.strategy is not None:
            strategy = resolve_strategy(options.strategy)
            if strategy is None:
                raise APIError(400, f"unknown strategy '{options.strategy}'; choose one of: {', '.join(STRATEGIES)}",
                               param="thinktime.strategy", code="invalid_value")
        return strategy or self.thinker.strategy

    def _strategy_options(self, req: ChatRequest, strategy: str, suffix_n: int | None) -> dict:
        """The strategy's options from thinktime.* and the model suffix, typed and within the server's caps."""
        options = req.thinktime
        extra = dict(options.model_extra or {}) if options else {}
        if options and options.n is not None:
            if strategy == "cot":
                raise APIError(400, "thinktime.n sets the chains of a multi-chain strategy; for n independent "
                                    "chains of cot, send the request's n", param="thinktime.n", code="invalid_value")
            extra["n"] = options.n
        elif suffix_n is not None:
            extra[SCALE_OPTION[strategy]] = suffix_n
        # Read each option as its type first ("3" and 3.0 are 3), then cap: the caps hold however it was written.
        extra = {**extra, **_check_options(strategy, extra)}
        # (lower bounds are the options' own: budget forcing's min_tokens may be 0)
        for names, low, cap, flag in ((PARALLEL_OPTIONS, 1, self.config.max_n, "--max-n"),
                                      (TOKEN_OPTIONS, 0, self.max_tokens_limit, "--max-tokens-limit")):
            for name in names:
                value = extra.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= cap:
                    where = "model" if suffix_n is not None and SCALE_OPTION.get(strategy) == name \
                        else f"thinktime.{name}"
                    raise APIError(400, f"{name} must be between {low} and {cap} on this server ({flag}), got {value}",
                                   param=where, code="invalid_value")
        return extra

    def _max_tokens(self, req: ChatRequest) -> int:
        """The request's token limit, or the server's default scaled by the reasoning effort."""
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        effort = REASONING_EFFORT.get(req.reasoning_effort or "medium")
        if max_tokens is None:  # the effort scales the default; a client's own max_tokens wins
            max_tokens = max(1, min(round(self.default_max_tokens * (effort or 1.0)), self.max_tokens_limit))
        elif not 1 <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"{param} must be between 1 and {self.max_tokens_limit}, got {max_tokens}",
                           param=param, code="invalid_value")
        return max_tokens

    def _check_n(self, req: ChatRequest, strategy: str) -> None:
        if not 1 <= req.n <= self.config.max_n:
            raise APIError(400, f"n must be between 1 and {self.config.max_n}, got {req.n}", param="n",
                           code="invalid_value")
        if req.n > 1 and strategy != "cot":
            raise APIError(400, f"n > 1 returns independent chains and needs the cot strategy; strategy "
                                f"'{strategy}' draws its own samples: set thinktime.n (or a model suffix "
                                f"like ':{strategy}-8') instead", param="n", code="invalid_value")

    def _logprobs(self, req: ChatRequest, strategy: str) -> int | None:
        """How many alternatives per token the request's logprobs ask for (None: no logprobs)."""
        if not req.logprobs:
            return None
        if strategy != "cot":
            raise APIError(400, f"logprobs are returned for the cot strategy's chains, not for '{strategy}'",
                           param="logprobs", code="invalid_value")
        if not getattr(self.engine, "returns_logprobs", False):
            raise APIError(400, f"the {self.engine.name} engine does not return log-probabilities; the transformers, "
                                "llamacpp and vllm engines do, and the openai engine where its server sends them",
                           param="logprobs", code="unsupported_parameter")
        return req.top_logprobs or 0

    def _thinker_for(self, req: ChatRequest, system: str | None) -> Thinker:
        """The server's thinker, or a copy with the request's system prompt, language or thinking turned off."""
        options = req.thinktime
        thinker = self.thinker
        no_thinking = req.reasoning_effort in ("none", "minimal")
        if system is not None or (options and options.lang) or no_thinking:
            thinker = copy.copy(thinker)
            if system is not None:
                thinker.system_prompt = system
            if options and options.lang:
                thinker.lang = options.lang
            if no_thinking:  # plain chat: no deep-thinking system prompt
                thinker.think = False
        return thinker

    def _prompt_tokens(self, ctx) -> int:
        """The rendered prompt's length in tokens, refused when it fills the context."""
        rendered = self.engine.render(ctx.prompt)
        if self.context_length and len(rendered) > self.context_length * 32:  # surely over: skip counting
            raise self._too_long(None)
        prompt_tokens = self.count_tokens(rendered)
        if self.context_length and prompt_tokens >= self.context_length:
            raise self._too_long(prompt_tokens)
        return prompt_tokens

    def _too_long(self, tokens: int | None) -> APIError:
        size = f"{tokens} tokens" if tokens is not None else "far longer than that"
        return APIError(400, f"This model's maximum context length is {self.context_length} tokens; "
                             f"the messages are {size}.", param="messages", code="context_length_exceeded")

    @staticmethod
    def _conversation(req: ChatRequest) -> tuple[str, list[dict[str, str]], str | None]:
        messages = req.messages
        last = messages[-1]
        if last.role != "user":
            raise APIError(400, "the last message must come from the user", param="messages", code="invalid_value")
        question = last.text()
        if not question.strip():
            raise APIError(400, "the last user message is empty", param="messages", code="invalid_value")
        systems = [m.text() for m in messages[:-1] if m.role in ("system", "developer")]
        history = [{"role": m.role, "content": m.text()} for m in messages[:-1] if m.role in ("user", "assistant")]
        return question, history, ("\n\n".join(systems) if systems else None)

    # --- non-streaming -------------------------------------------------------------------------

    def make_job(self, loop: asyncio.AbstractEventLoop, strategy: str, ctx, n: int, stream_to=None) -> Job:
        future = loop.create_future()
        if strategy == "cot":
            params = chain_params(ctx, n)  # cot's own sizing: n chains that fit the budget
            if params.max_new_tokens < 1:
                raise APIError(400, f"budget_tokens leaves no room for {n} chains", param="thinktime.budget_tokens",
                               code="invalid_value")
        if stream_to is None and strategy == "cot":
            return Job(loop, future, prompt=ctx.prompt, params=params)
        job = Job(loop, future)
        ctx.cancel = job.cancel
        if stream_to is None:
            job.run = lambda cancel: get_strategy(strategy)(ctx)
            return job

        def push(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(stream_to.put_nowait, item)
            except RuntimeError:
                pass

        if strategy == "cot":
            def run(cancel: threading.Event):
                try:
                    for delta in self.engine.stream(ctx.prompt, params, cancel):
                        push(delta)
                finally:
                    push(None)
        else:
            ctx.emit = push

            def run(cancel: threading.Event):
                try:
                    push(Event("result", result=get_strategy(strategy)(ctx)))
                finally:
                    push(None)
        job.run = run
        return job

    def completion_body(self, rid: str, model: str, strategy: str, result: Any, prompt_tokens: int) -> dict:
        created = int(time.time())
        if isinstance(result, list):  # cot: n completions of one prompt
            choices, contents = [], []
            for i, completion in enumerate(result):
                reasoning, content = reply_split(completion.text, completion.finish_reason, self.think_tags)
                contents.append(content)
                choices.append({"index": i, "message": _message(reasoning, content),
                                "logprobs": logprobs_field(completion), "finish_reason": finish_reason(completion.finish_reason)})
            usage = {"prompt_tokens": result[0].prompt_tokens,
                     "completion_tokens": sum(c.completion_tokens for c in result)}
            extension = cot_extension(result)
        else:
            reasoning, content = reply_split(result.text, result.finish_reason, self.think_tags)
            contents = [content]
            choices = [{"index": 0, "message": _message(reasoning, content),
                        "logprobs": None, "finish_reason": finish_reason(result.finish_reason)}]
            usage = {"prompt_tokens": result.usage.prompt_tokens, "completion_tokens": result.usage.completion_tokens}
            extension = result_extension(result)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens(usage, contents)}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices, "usage": usage, "thinktime": extension}


def _check_options(strategy: str, options: dict) -> dict:
    """Unknown or bad strategy options are a 400 now, not an error in the middle of a stream; returns the
    options given, each as its option's type."""
    from thinktime.strategies import check_options

    try:
        return check_options(strategy, {k: v for k, v in options.items() if k != "strategy"})
    except ThinktimeError as exc:
        message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
        raise APIError(400, message, param="thinktime", code="invalid_value") from None


def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def cot_extension(completions) -> dict:
    """cot's thinktime fields: the checked answer of each choice (the first choice's at the top, as one
    chain's strategies report it)."""
    from thinktime.strategies.base import to_candidate

    candidates = [to_candidate(c) for c in completions]
    return {"strategy": "cot", "answer": candidates[0].answer, "answer_method": candidates[0].answer_method,
            "answers": [{"answer": c.answer, "answer_method": c.answer_method} for c in candidates]}


def result_extension(result) -> dict:
    """thinktime's own fields: the checked answer and, for multi-chain strategies, votes and candidates."""
    return {"strategy": result.strategy, "answer": result.answer, "answer_method": result.answer_method,
            "seconds": round(result.seconds, 3),
            "candidates": [{"answer": c.answer, "votes": c.votes, "score": c.score,
                            "finish_reason": c.finish_reason, "completion_tokens": c.usage.completion_tokens}
                           for c in result.candidates],
            "details": _jsonable(result.details)}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


def logprobs_field(completion) -> dict | None:
    """A completion's token log-probabilities in OpenAI's shape (streams send them with the choice's last chunk)."""
    if completion.logprobs is None:
        return None

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(text, lp) for _, text, lp in t.top]}
                        for t in completion.logprobs], "refusal": None}


def _message(reasoning: str, content: str) -> dict:
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "reasoning": reasoning,
            "refusal": None}
