"""The llama.cpp engine: a GGUF model on its own quantised weights, every sample of every call in one batch.

Built on llama-cpp-python's low-level API (engines/llamacpp_native.py) and a continuous-batching
scheduler (engines/llamacpp_scheduler.py): n samples of a prompt share its KV cache (one prefill,
then sequence copies), several prompts decode in one llama_batch, a prompt that starts like an
earlier one (a system prompt, a chain continued step by step) prefills only its new tokens, and
calls from several threads (the server's clients) join the same batch.
"""
from __future__ import annotations

import hashlib
import random
import threading
import weakref
from collections.abc import Iterator, Sequence

from thinktime import models
from thinktime.engines import gguf_choice
from thinktime.engines.base import Engine
from thinktime.engines.llamacpp_native import Native, default_threads
from thinktime.engines.llamacpp_rows import Request
from thinktime.engines.llamacpp_scheduler import RESERVED_CELLS, Scheduler
from thinktime.engines.logprob_checks import check_logprob_params
from thinktime.errors import BadInputError, ThinktimeError
from thinktime.threads import iterate_in_thread
from thinktime.types import Completion, Prompt, SamplingParams, StreamDelta

INSTALL_HINT = "pip install 'thinktime[llamacpp]' (llama-cpp-python; it compiles llama.cpp, about 9 minutes)"


class LlamaCppEngine(Engine):
    name = "llamacpp"
    #: calls from several threads decode in one batch (the server runs its clients' jobs side by side)
    continuous_batching = True
    #: SamplingParams.logprobs is answered (Completion.logprobs)
    returns_logprobs = True

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 threads: int | None = None, max_batch_rows: int = 64, kv_cells: int | None = None,
                 tokenizer: str | None = None, trust_remote_code: bool = False, source: str | None = None):
        if device not in (None, "", "auto", "cpu"):
            raise BadInputError(f"the llamacpp engine runs on the CPU, not {device!r}",
                                hint="drop --device, or use --engine transformers or vllm on a GPU")
        if dtype not in (None, "", "auto"):
            raise BadInputError("the llamacpp engine runs a GGUF on its own weights; --dtype does not apply",
                                hint="drop --dtype, or convert the model to the type you want (thinktime convert)")
        if not isinstance(max_batch_rows, int) or not 1 <= max_batch_rows <= 192:
            raise BadInputError(f"max_batch_rows must be 1..192, got {max_batch_rows!r}")
        self.device = "cpu"
        path, self.spec = models.resolve_gguf(model, source=source)
        self.model_name = self.spec.alias if self.spec else str(model)
        self.threads = threads or default_threads()
        self.gguf_type = None  # the embedded model's weights type and why (the shipped one unless asked)
        if self.spec is not None and self.spec.embedded:
            path, self.gguf_type = gguf_choice.choose(path, self.threads)
        # an eval run records it (its records come from one weights type); the shipped file's is the empty one
        self.dtype = "" if self.gguf_type is None or self.gguf_type["type"] == gguf_choice.SHIPPED \
            else self.gguf_type["type"]
        self.path = path
        models.check_fits(self.model_name, path.stat().st_size, "cpu")
        cache_seqs = 16
        cells = kv_cells or 32768
        self.native = Native(path, cells=cells, sequences=max_batch_rows + cache_seqs + 1, threads=self.threads)
        # a prompt and its new tokens must fit the cells the scheduler admits a row into
        self.context_length = min(self.native.n_ctx_train or cells, self.native.cells - RESERVED_CELLS)
        self._render = self._chat_renderer(tokenizer, trust_remote_code)
        self.max_batch_rows = max_batch_rows
        self.scheduler = Scheduler(self.native, max_rows=max_batch_rows, cache_seqs=cache_seqs,
                                   cache_cells=max(4096, self.native.cells // 4))
        # an engine dropped without close() still stops its worker and frees the model and the KV cache
        weakref.finalize(self, self.scheduler.close)

    def _chat_renderer(self, tokenizer: str | None, trust_remote_code: bool):
        """The chat template of the model's tokenizer where one is given, else the GGUF's own, rendered in a
        sandboxed Jinja environment as transformers renders it."""
        if tokenizer:
            from transformers import AutoTokenizer

            from thinktime.engines.chat import render_chat

            hf = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
            return lambda prompt: render_chat(hf, prompt)
        template = self.native.chat_template()
        if not template:
            self.native.close()
            raise BadInputError(f"{self.path.name} has no chat template: it is not a chat model",
                                hint="use an instruct/chat GGUF, or give the engine a tokenizer that has a chat "
                                     "template (Python: Thinker(engine='llamacpp', tokenizer=FOLDER))")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos, eos = (self.native.token_text(t) if t >= 0 else "" for t in self.native.special_tokens())
        formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        return lambda prompt: formatter(messages=list(prompt.messages)).prompt + prompt.prefix

    # --- the protocol -------------------------------------------------------------------------

    def render(self, prompt: Prompt) -> str:
        return self._render(prompt)

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text))

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 cancel: threading.Event | None = None) -> list[list[Completion]]:
        requests = self._requests(prompts, params, cancel or threading.Event())
        return self._wait(requests)

    def stream(self, prompt: Prompt, params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        cancel = cancel or threading.Event()
        (request,) = self._requests([prompt], params, cancel)

        def work(emit) -> None:
            request.emit = emit
            self._wait([request])

        yield from iterate_in_thread(work, cancel, name="thinktime-llamacpp-stream")

    def close(self) -> None:
        self.scheduler.close()

    # --- internals ----------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[int]:
        tokens = self.native.tokenize(text)
        if tokens is None:
            raise ThinktimeError("this llama.cpp engine is closed", hint="create another engine")
        return tokens

    def _requests(self, prompts: Sequence[Prompt], params: SamplingParams,
                  cancel: threading.Event) -> list[Request]:
        check_params(params, len(prompts))
        requests = []
        base = params.seed if params.seed is not None else random.getrandbits(63)
        for p, prompt in enumerate(prompts):
            tokens = self._tokenize(self.render(prompt))
            if len(tokens) >= self.context_length:
                raise BadInputError(
                    f"the prompt is {len(tokens)} tokens but {self.model_name} takes at most {self.context_length}",
                    hint="shorten the question or the system prompt (--no-think drops the thinking prompt)")
            if not tokens:
                raise BadInputError("the rendered prompt is empty")
            if params.seeds is not None:  # each prompt draws what it would alone with its seed
                seeds = [row_seed(params.seeds[p], k) for k in range(params.n)]
            else:
                seeds = [row_seed(base, p * params.n + k) for k in range(params.n)]
            requests.append(Request(tokens, params.n, min(params.max_new_tokens, self.context_length - len(tokens)),
                                    params.greedy, params.temperature, params.top_p, seeds, tuple(params.stop),
                                    params.logprobs, params.stop_below, cancel))
        return requests

    def _wait(self, requests: list[Request]) -> list[list[Completion]]:
        if not requests:
            return []
        self.scheduler.submit(requests)
        try:
            while not all(request.done.wait(0.05) for request in requests):
                failed = next((r for r in requests if r.error is not None), None)
                if failed is not None:  # the first error ends the call now, not after the rest has decoded
                    raise failed.error
            failed = next((r for r in requests if r.error is not None), None)
            if failed is not None:
                raise failed.error
        except BaseException:  # an error, or the caller interrupted (Ctrl-C): the rest is for nobody now
            for request in requests:
                request.abort.set()
            raise
        return [list(request.results) for request in requests]


def check_params(params: SamplingParams, prompts: int) -> None:
    """What the scheduler cannot serve is refused before anything is queued."""
    if params.n < 1 or params.max_new_tokens < 1:
        raise BadInputError(f"n and max_new_tokens must be at least 1, got n={params.n}, "
                            f"max_new_tokens={params.max_new_tokens}")
    if params.seeds is not None and len(params.seeds) != prompts:
        raise BadInputError(f"{len(params.seeds)} seeds for {prompts} prompts", hint="one seed per prompt")
    check_logprob_params(params)


def row_seed(seed: int, row: int) -> int:
    """A 32-bit seed for sample `row` of a prompt seeded `seed`, spread by a hash so that neighbouring seeds
    and rows never share a random stream."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


__all__ = ["LlamaCppEngine", "available", "INSTALL_HINT", "row_seed"]
