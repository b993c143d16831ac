"""The transformers engine: chat template, batched sampling with left padding, true token streaming.

The InternLM3 tutorial's bugs are fixed here: the prompt goes through the model's chat template, only
new tokens are decoded, generation stops at eos and <|im_end|>, and streaming is real (a streamer
fed by `generate` step by step, not a method that does not exist).
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from thinktime import models
from thinktime.engines import cpu_attention, cpu_tuning, decode_loop, hf_batching
from thinktime.engines.base import Engine
from thinktime.engines.chat import render_chat, stop_token_ids
from thinktime.engines.decode_rows import Rows, env_flag
from thinktime.engines.device import fp32_fits, pick_device, pick_dtype, refuse_cpu_for_large, stored_as_fp32
from thinktime.engines.fast_support import generation_config_blocker
from thinktime.engines.growing_cache import GrowingLayer, growing, new_growing_cache
from thinktime.engines.hf_outputs import completions
from thinktime.engines.hf_streaming import CancelCriteria, QueueStreamer, StopStrings
from thinktime.engines.lean_step import LeanStep
from thinktime.engines.onednn import pack_linears
from thinktime.engines.prefix_cache import PrefixCache, unpadded
from thinktime.engines.logprob_checks import check_logprob_params
from thinktime.engines.token_logprobs import LogprobRows, record_generated
from thinktime.errors import BadInputError, InsufficientMemoryError, ThinktimeError
from thinktime.threads import iterate_in_thread
from thinktime.types import Completion, Prompt, SamplingParams, StreamDelta


class TransformersEngine(Engine):
    name = "transformers"
    #: SamplingParams.logprobs is answered (Completion.logprobs)
    returns_logprobs = True

    def __init__(self, model: str, *, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, allow_bin: bool = False, source: str | None = None,
                 max_batch_rows: int = 64, prefix_cache_tokens: int = 32768, fast: bool | None = None):
        explicit_cpu = device == "cpu"
        self.device = pick_device(device)
        known = models.ALIASES.get(model.strip().lower()) if isinstance(model, str) else None
        if known is not None:  # refuse before a download of many GB, not after
            refuse_cpu_for_large(known.alias, known.params_b, self.device, explicit_cpu)
            models.check_fits(known.alias, int(known.bf16_gb * 1e9), self.device)
        resolved = models.resolve(model, source=source)
        self.model_name = resolved.spec.alias if resolved.spec else model
        self.spec = resolved.spec
        tuning = self._load(resolved, dtype, explicit_cpu, trust_remote_code, allow_bin, fast)
        # On the CPU, which kernels it runs and why: {"dtype", "onednn", "decode_attention", "shared_prefix",
        # "lean_step", "source": "measured" | "cached" | "env" | "default", ...}; None on a GPU.
        self.cpu_kernels = cpu_tuning.settle(tuning, self.model, trust_remote_code)
        if self.cpu_kernels is not None:
            self.dtype = self.model.dtype
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.decode([min(self.stop_ids)])
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.max_batch_rows = max_batch_rows
        self._lock = threading.Lock()  # one generate at a time: the global RNG seed is per call
        self._tokenizer_lock = threading.Lock()  # encoding from several threads (the server counts while it decodes)
        # KV caches of continued prompts (a Prompt.prefix), so a chain that grows step by step is
        # not prefilled again in full at every step; 0 turns it off.
        self.prefix_cache = PrefixCache(self.model, prefix_cache_tokens)
        self._start_fast_decoder(fast)
        self._choose_cpu_decoding(trust_remote_code)
        # Serving: calls from several threads decode in one batch (start_continuous_batching); None otherwise.
        self.batcher: hf_batching.Batcher | None = None
        self._batching_users = 0  # servers over this engine that started it

    def _load(self, resolved, dtype: str | None, explicit_cpu: bool, trust_remote_code: bool, allow_bin: bool,
              fast: bool | None) -> cpu_tuning.Tuning | None:
        """The tokenizer and the model, in the dtype asked for or chosen; on the CPU, where the kernels' verdict
        comes from (the model loads in the cached verdict's dtype, or in fp32 to time both)."""
        weight_bytes = models.weights_bytes(resolved.path)
        params_b = resolved.spec.params_b if resolved.spec else weight_bytes / 2e9
        refuse_cpu_for_large(self.model_name, params_b, self.device, explicit_cpu)
        self.dtype = pick_dtype(dtype, self.device, weight_bytes)
        tuning = cpu_tuning.for_load(self.device, resolved.path, None if dtype in (None, "", "auto") else self.dtype,
                                     self.dtype, fp32_fits(weight_bytes), trust_remote_code, fast)
        if tuning is not None:
            self.dtype = tuning.load_dtype
        stored_bytes_per_param = 4 if stored_as_fp32(resolved.path) else 2
        models.check_fits(self.model_name, weight_bytes, self.device,
                          bytes_per_param_scale=torch.finfo(self.dtype).bits / 8 / stored_bytes_per_param)
        hf_logging.disable_progress_bar()  # thinktime shows its own progress; keep the output clean
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"  # batched decoding needs prompts aligned at the right
        load_kwargs = dict(dtype=self.dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_bin)
        if self.device.startswith("cuda"):
            load_kwargs["device_map"] = "auto"
        self.model = AutoModelForCausalLM.from_pretrained(resolved.path, **load_kwargs)
        if not self.device.startswith("cuda"):
            self.model.to(self.device)
        self.model.eval()
        return tuning

    def _start_fast_decoder(self, fast: bool | None) -> None:
        """The fast decoder (static KV cache, CUDA graphs; thinktime/engines/fast.py): the default on CUDA,
        off with fast=False (--no-fast) or THINKTIME_FAST=0; calls it cannot serve go to generate()."""
        self.fast = None
        # Its first call also decodes 16 greedy tokens with generate and compares (engines/fast_check.py): the
        # outcome ("passed", "failed at position 7", "skipped (THINKTIME_FAST=verified)"); None until then.
        self.fast_check: str | None = None
        if fast is None:
            fast = self.device.startswith("cuda") and env_flag("THINKTIME_FAST", True)
        if fast:
            from thinktime.engines.fast import FastDecoder, FastPathUnavailable

            try:
                self.fast = FastDecoder(self.model)
            except FastPathUnavailable as exc:
                warnings.warn(f"thinktime fast decoding off: {exc}; using generate", RuntimeWarning, stacklevel=3)

    def _choose_cpu_decoding(self, trust_remote_code: bool) -> None:
        """The CPU decoding pieces that won the timing (self.cpu_kernels); on a GPU none."""
        kernels = self.cpu_kernels or {}
        # generate() runs on oneDNN-packed linear layers (2-3x MKL's speed for decoding on a Zen 5; engines/onednn.py);
        # the fast decoder reads the plain weights.
        self.packed_linears = pack_linears(self.model) if self.fast is None and kernels.get("onednn") else 0
        # ...and one-query attention as two matrix products per KV group, not a flash kernel (engines/cpu_attention.py),
        # or that attention only over a shared prefix (below) and sdpa for the rest.
        self.cpu_decode_attention = bool(kernels.get("decode_attention") or kernels.get("shared_prefix")) and \
            cpu_attention.use_for(self.model, one_query=kernels["decode_attention"])
        # On the CPU copying the KV cache at every step costs more than attention itself; remote-code
        # models may not take a Cache object, so they keep generate()'s own.
        self.grow_cache_in_place = self.device == "cpu" and not trust_remote_code
        # ...and decoding drops finished rows from the batch (engines/decode_loop.py); generate() serves
        # the rest (a GPU, the fast decoder's calls, generation-config settings the loop does not apply).
        self.decode_loop = self.grow_cache_in_place
        # ...reading a prompt shared by several rows (n samples, a batch's system prompt) once per step, which
        # takes the attention above to read the shared part (engines/shared_prefix.py).
        self.shared_prefix_decoding = self.decode_loop and self.cpu_decode_attention and \
            kernels.get("shared_prefix", False)
        # ...and its one-token steps call the layers' pieces directly where the model is Llama-shaped
        # (engines/lean_step.py); THINKTIME_LEAN_STEP=0 keeps the model's forward.
        self.lean_step = None
        if self.shared_prefix_decoding and kernels.get("lean_step") and \
                LeanStep.unavailable_reason(self.model) is None:
            self.lean_step = LeanStep(self.model)

    # --- the protocol -------------------------------------------------------------------------

    def render(self, prompt: Prompt) -> str:
        return render_chat(self.tokenizer, prompt)

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 cancel: threading.Event | None = None) -> list[list[Completion]]:
        self._check_open()
        check_logprob_params(params)
        if not prompts:
            return []
        per_call = max(1, self.max_batch_rows // max(1, params.n))
        results: list[list[Completion]] = []
        if params.seeds is not None and not params.greedy and not self._draws_per_prompt():
            per_call = 1  # model.generate draws from one global generator: a prompt at a time, each with its seed
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            chunk_params = params.for_prompts(start, start + len(chunk))
            if start and chunk_params.seeds is None and chunk_params.seed is not None:
                # each chunk draws afresh: the same seed again would repeat the first chunk's samples
                chunk_params = replace(chunk_params, seed=chunk_params.seed + 1_000_003 * (start // per_call))
            if len(chunk) == 1:
                chunk_params = chunk_params.for_prompt(0)
            results.extend(self._run([self.render(p) for p in chunk], chunk_params, cancel or threading.Event(),
                                     reuse=_should_reuse(chunk, params),
                                     # a batch of fresh questions shares its system prompt; the rows
                                     # themselves will not come again, continuations will
                                     keep_rows=len(chunk) == 1 or any(p.prefix for p in chunk)))
        return results

    def stream(self, prompt: Prompt, params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        self._check_open()
        check_logprob_params(params)
        cancel = cancel or threading.Event()

        def work(emit) -> None:
            streamer = QueueStreamer(self.tokenizer, params.n, self.stop_ids | {self.tokenizer.pad_token_id}, emit,
                                      params.stop)
            rows = self._run([self.render(prompt)], params.for_prompt(0), cancel, streamer,
                             reuse=_should_reuse([prompt], params))
            for index, completion in enumerate(rows[0]):
                emit(StreamDelta(index, streamer.decoders[index].finish(completion.text), completion))

        yield from iterate_in_thread(work, cancel, name="thinktime-generate")

    def close(self) -> None:
        """Frees the model: every holder of it (the fast decoder, the lean step, the prefix cache's KV entries).
        A generate running in another thread finishes first (cancel it to make that quick)."""
        self._batching_users = 0
        self.stop_continuous_batching()
        with self._lock:
            self.fast = None  # it holds the weights and its KV cache
            self.lean_step = None
            self.prefix_cache.clear()
            self.prefix_cache.model = None
            self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _draws_per_prompt(self) -> bool:
        """Whether this engine's calls decode in its own loop or fast path, which draw a prompt's samples from
        that prompt's seed; generate() (a generation config only it applies) draws from one global generator."""
        blocked = generation_config_blocker(self.model.generation_config) is not None
        return not blocked and (self.fast is not None or self.decode_loop)

    def _check_open(self) -> None:
        if self.model is None:
            raise ThinktimeError("this transformers engine is closed", hint="create another engine")

    # --- internals ----------------------------------------------------------------------------

    def _run(self, texts: list[str], params: SamplingParams, *args, **kwargs) -> list[list[Completion]]:
        try:
            return self._decode(texts, params, *args, **kwargs)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what the failed call held goes back: the next, smaller call can run
            rows = len(texts) * params.n
            raise InsufficientMemoryError(
                f"{self.device} memory ran out decoding {rows} row(s) of up to {params.max_new_tokens} new tokens "
                f"with {self.model_name}: {str(exc).splitlines()[0][:200]}",
                hint="ask for fewer samples at once (n; the server's --max-batch), fewer --max-new-tokens, "
                     "or a smaller model") from None

    def _decode(self, texts: list[str], params: SamplingParams, cancel: threading.Event,
                streamer: BaseStreamer | None = None, reuse: bool = False,
                keep_rows: bool = True) -> list[list[Completion]]:
        if cancel.is_set():  # cancelled before it began (or between chunks): nothing to prefill
            return [[Completion("", "cancelled", 0, 0, [], False) for _ in range(params.n)] for _ in texts]
        enc, max_new = self._encode(texts, params)
        kwargs = self._generate_kwargs(params, cancel, enc.input_ids.shape[1], max_new, streamer)
        loop = self.fast is None and self.decode_loop and generation_config_blocker(self.model.generation_config) is None
        # Log-probabilities come from the same logits the tokens were drawn from: the decoding loop's, or generate's.
        recorder = None if params.logprobs is None else LogprobRows(len(texts) * params.n, params, self._token_text)
        if recorder is not None and not loop:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        batcher = self.batcher if loop else None  # the batch other threads' calls decode in, when serving
        new_tokens = out = job = None
        with self._lock, torch.inference_mode():
            self._check_open()  # closed by another thread while this call waited for the lock
            inputs = self._start_inputs(enc, params, kwargs, loop, batcher is not None, reuse, keep_rows)
            if batcher is not None:  # decoded by the batcher's worker, after this lock is let go
                state = Rows(inputs[0].shape[0], set(self.stop_ids), self.tokenizer.pad_token_id, tuple(params.stop),
                             self.tokenizer, streamer)
                job = hf_batching.job_for(*inputs[:2], kwargs[self.prefix_cache.kwarg], params, max_new, state,
                                          recorder, cancel)
            else:
                new_tokens, out = self._run_decoder(enc, inputs, kwargs, params, max_new, loop, streamer, recorder,
                                                    cancel, reuse)
        if job is not None:
            new_tokens = batcher.decode(job)
        stop_ids = self.stop_ids | {self.tokenizer.pad_token_id}
        if recorder is not None and not loop:  # replayed after the fact: a row unsure at step s is cut there
            kept = record_generated(recorder, out.logits, new_tokens, stop_ids)
            new_tokens = [row[:length] for row, length in zip(new_tokens, kept)]
        return completions(self.tokenizer, new_tokens, enc.attention_mask.sum(dim=1).tolist(), params, cancel,
                           stop_ids, recorder)

    def _encode(self, texts: list[str], params: SamplingParams):
        """The prompts' token ids, left-padded to one width, and the new tokens the context leaves room for."""
        with self._tokenizer_lock:  # padding=True flips a setting of the shared fast tokenizer while it runs
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc.input_ids.shape[1]
        max_new = params.max_new_tokens
        if self.context_length:
            if width >= self.context_length:
                raise BadInputError(
                    f"the prompt is {width} tokens but {self.model_name} takes at most {self.context_length}",
                    hint="shorten the question or the system prompt (--no-think drops the thinking prompt)")
            max_new = min(max_new, self.context_length - width)
        return enc, max_new

    def _generate_kwargs(self, params: SamplingParams, cancel: threading.Event, width: int, max_new: int,
                         streamer: BaseStreamer | None) -> dict:
        """generate()'s settings for this call (the decoding loop reads its cache from them too)."""
        kwargs = dict(
            max_new_tokens=max_new,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([CancelCriteria(cancel)]),
        )
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
        if params.stop:
            kwargs["stopping_criteria"].append(StopStrings(params.stop, self.tokenizer, width))
        if streamer is not None:
            kwargs["streamer"] = streamer
        return kwargs

    def _start_inputs(self, enc, params: SamplingParams, kwargs: dict, loop: bool, batched: bool, reuse: bool,
                      keep_rows: bool):
        """(input ids, attention mask, first logits or None) with each prompt repeated n times, and in kwargs the
        cache they start from: a shared prefix, what the prefix cache holds of them, or an empty growing cache."""
        device = self.model.device
        # Each prompt repeated n times, rather than num_return_sequences, which greedy decoding refuses.
        input_ids = enc.input_ids.repeat_interleave(params.n, 0).to(device)
        attention_mask = enc.attention_mask.repeat_interleave(params.n, 0).to(device)
        several = enc.input_ids.shape[0] > 1
        shared = None
        if loop and not batched and self.shared_prefix_decoding and (reuse or several):
            # The rows' common start is cached once and read once per step (engines/shared_prefix.py).
            shared = self.prefix_cache.shared_inputs(enc, params.n, keep_rows, self.tokenizer.pad_token_id)
        first_logits = None
        if shared is not None:
            kwargs[self.prefix_cache.kwarg], input_ids, attention_mask, first_logits = shared
        # Without the fast decoder (which prefills per prompt), a batch of several prompts also goes
        # through the prefix cache: their common start (the system prompt) is prefilled once.
        elif self.fast is None and (reuse or several or batched):  # the fast decoder keeps its own
            cached = self.prefix_cache.batch_for(unpadded(enc), params.n, keep_rows=keep_rows)
            if cached is not None:
                kwargs[self.prefix_cache.kwarg] = growing(cached) if self.grow_cache_in_place else cached
        if self.grow_cache_in_place and self.prefix_cache.kwarg not in kwargs:
            # A cache that grows in place instead of copying itself at every step (engines/growing_cache.py).
            kwargs[self.prefix_cache.kwarg] = new_growing_cache(self.model.config)
        if params.seed is not None or params.seeds:
            torch.manual_seed(params.seeds[0] if params.seeds else params.seed)
        return input_ids, attention_mask, first_logits

    def _run_decoder(self, enc, inputs, kwargs: dict, params: SamplingParams, max_new: int, loop: bool, streamer,
                     recorder: LogprobRows | None, cancel: threading.Event, reuse: bool):
        """New tokens per row from the fast decoder, the decoding loop or generate (and generate's output)."""
        input_ids, attention_mask, first_logits = inputs
        if self.fast is not None and recorder is None:  # None when it cannot serve this call (says why, once)
            from thinktime.engines.fast import run_for_engine

            new_tokens = run_for_engine(self, enc, params, max_new, cancel, streamer, reuse)
            if new_tokens is not None:
                return new_tokens, None
        if loop:
            return decode_loop.decode(
                self.model, input_ids, attention_mask, cache=kwargs[self.prefix_cache.kwarg],
                cache_kwarg=self.prefix_cache.kwarg, max_new_tokens=max_new, greedy=params.greedy,
                temperature=params.temperature, top_p=params.top_p,
                seed=list(params.seeds) if params.seeds else params.seed, stop_ids=self.stop_ids,
                pad_id=self.tokenizer.pad_token_id, stop_strings=params.stop, tokenizer=self.tokenizer,
                streamer=streamer, cancel=cancel, lean=self.lean_step,
                first_logits=first_logits, logprobs=recorder), None
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        sequences = out.sequences if recorder is not None else out
        return sequences[:, enc.input_ids.shape[1]:].tolist(), out

    def start_continuous_batching(self, max_rows: int) -> bool:
        """From now on, calls from several threads that the CPU decoding loop serves decode in one batch, rows
        joining and leaving between steps (engines/hf_batching.py): the server's mode. False where that loop
        does not serve this engine (a GPU, remote code, a generation config only generate applies)."""
        if self.batcher is None and self.decode_loop and self.fast is None and \
                generation_config_blocker(self.model.generation_config) is None and \
                all(type(layer) is GrowingLayer for layer in new_growing_cache(self.model.config).layers):
            self.batcher = hf_batching.Batcher(self.model, self.prefix_cache.kwarg, self._lock, max_rows)
        self._batching_users += self.batcher is not None
        return self.batcher is not None

    def stop_continuous_batching(self) -> None:
        """One user of the batch is done (a server stopped); with the last, calls run one at a time again (what
        is decoding finishes first)."""
        self._batching_users = max(0, self._batching_users - 1)
        batcher = self.batcher
        if batcher is not None and not self._batching_users:
            self.batcher = None
            batcher.close()

    @property
    def continuous_batching(self) -> bool:
        return self.batcher is not None

    def _token_text(self, token: int) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode([token])


def _should_reuse(prompts: Sequence[Prompt], params: SamplingParams) -> bool:
    """Prefill through the prefix cache for continuations (the prefix was seen before) and for n > 1
    samples (the prompt is prefilled once and its KV cache shared by the n rows, instead of n times).
    A plain single greedy chain goes without: a reused cache can differ in the last float bits."""
    return params.n > 1 or all(p.prefix for p in prompts)
