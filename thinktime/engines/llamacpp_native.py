"""llama.cpp through llama-cpp-python's low-level API: a model, one context, batches, samplers.

The high-level `llama_cpp.Llama` decodes one sequence at a time; batching several sequences per
`llama_batch` (n samples, several prompts, rows joining between steps) needs the C API, which this
module wraps in a few plain methods so the scheduler above it reads as Python.
"""
from __future__ import annotations

import collections
import ctypes
import os
import threading
from pathlib import Path

import numpy as np

import llama_cpp

from thinktime.errors import BadInputError, EngineError

_LOG = collections.deque(maxlen=40)  # llama.cpp's recent warnings and errors, quoted in our errors


@llama_cpp.llama_log_callback
def _keep_log(level: int, text: bytes, user_data) -> None:
    if level in (2, 3) and text:  # warn, error: kept for messages; info and debug dropped
        _LOG.append(text.decode("utf-8", "replace").rstrip())


llama_cpp.llama_log_set(_keep_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


def recent_log() -> str:
    return " | ".join(line for line in list(_LOG)[-4:] if line)


def default_threads() -> int:
    """The cores this process may use (OMP_NUM_THREADS where set: a shared machine's free cores)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Native:
    """One model and one context whose KV cache is unified: sequences copied from one another share cells."""

    def __init__(self, path: Path, *, cells: int, sequences: int, threads: int, batch_tokens: int = 2048):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        _LOG.clear()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise BadInputError(f"llama.cpp could not load {path}: {recent_log() or 'not a GGUF model file'}",
                                hint="check that the file is a complete GGUF model (re-download or re-convert it)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cells
        cparams.n_batch = cparams.n_ubatch = batch_tokens
        cparams.n_seq_max = sequences
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True  # n samples and shared prompts hold their common prefix once
        # llama.cpp's default (flash attention where it runs): 10x the tokens/s of the plain kernel for 8 rows here.
        # Either way a row's logits move with the other rows in the cache (the cells it sums over, activations
        # rounded to 8 bits): batching can flip a greedy near-tie, as in vLLM (docs: engines).
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise EngineError(f"llama.cpp could not create a context of {cells} cells: {recent_log()}",
                              hint="ask for fewer KV cells (--kv-cells) or fewer rows (--max-batch)")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.cells = llama_cpp.llama_n_ctx(self.ctx)
        self.batch_tokens = batch_tokens
        self._batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self._views = {name: np.ctypeslib.as_array(getattr(self._batch, name), shape=(batch_tokens,))
                       for name in ("token", "pos", "n_seq_id", "logits")}
        self._seq_slots = [self._batch.seq_id[i] for i in range(batch_tokens)]
        self._pieces: dict[int, bytes] = {}
        self._open = threading.Lock()  # tokenizing from callers' threads never meets a model being freed

    # --- model facts ------------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        size = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if size < 0 else buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        text = llama_cpp.llama_model_chat_template(self.model, None)
        return text.decode("utf-8") if text else None

    def token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def special_tokens(self) -> tuple[int, int]:
        return llama_cpp.llama_vocab_bos(self.vocab), llama_cpp.llama_vocab_eos(self.vocab)

    def is_end_of_turn(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # --- text <-> tokens --------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int] | None:
        """Tokens of `text`; special tokens written in it (a rendered chat template's) are parsed, none added.
        None once the model is closed."""
        data = text.encode("utf-8")
        room = len(data) + 8
        buf = (llama_cpp.llama_token * room)()
        with self._open:
            if self.model is None:
                return None
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, room, False, True)
        return list(buf[:count])

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for; special tokens stand for none (as skip_special_tokens)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if size < 0:
                buf = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -size, 0, False)
            piece = self._pieces[token] = buf.raw[:size]
        return piece

    # --- the KV cache -----------------------------------------------------------------------------

    def copy_sequence(self, source: int, target: int, length: int) -> None:
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, 0, length)

    def truncate_sequence(self, seq: int, length: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, length, -1)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    # --- decoding ---------------------------------------------------------------------------------

    def decode(self, tokens: list[int], positions: list[int], seqs: list[int], wants: list[bool]) -> int:
        """One llama_decode of these tokens (at most batch_tokens); llama.cpp's status code (0: done,
        1: no free KV cells for them)."""
        count = len(tokens)
        views = self._views
        views["token"][:count] = tokens
        views["pos"][:count] = positions
        views["n_seq_id"][:count] = 1
        views["logits"][:count] = wants
        slots = self._seq_slots
        for i, seq in enumerate(seqs):
            slots[i][0] = seq
        self._batch.n_tokens = count
        status = llama_cpp.llama_decode(self.ctx, self._batch)
        if status < 0 or status > 1:
            raise EngineError(f"llama.cpp failed to decode a batch of {count} tokens (status {status}): "
                              f"{recent_log() or 'no message'}")
        return status

    def logits(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))

    def token_logprobs(self, index: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """The log-probability of `token` under the logits of batch output `index` (the model's own, before
        temperature and top-p), and the `top` most likely tokens with theirs."""
        logits = self.logits(index).astype(np.float64)
        peak = logits.max()
        normaliser = peak + np.log(np.exp(logits - peak).sum())
        best = []
        if top > 0:
            ids = np.argpartition(-logits, top)[:top]
            ids = ids[np.argsort(-logits[ids])]
            best = [(int(i), float(logits[i] - normaliser)) for i in ids]
        return float(logits[token] - normaliser), best

    def token_string(self, token: int) -> str:
        """A token as text for log-probability listings: its bytes, or its own name for a special token."""
        piece = self.piece(token)
        return piece.decode("utf-8", "replace") if piece else self.token_text(token)

    def sampler(self, *, greedy: bool, temperature: float, top_p: float, seed: int):
        """A sampler chain as transformers applies them: temperature, then top-p, then a seeded draw."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if greedy:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        if top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def sample(self, sampler, index: int) -> int:
        return llama_cpp.llama_sampler_sample(sampler, self.ctx, index)

    @staticmethod
    def free_sampler(sampler) -> None:
        llama_cpp.llama_sampler_free(sampler)

    def close(self) -> None:
        with self._open:
            if self.ctx:
                llama_cpp.llama_batch_free(self._batch)
                llama_cpp.llama_free(self.ctx)
                self.ctx = None
            if self.model:
                llama_cpp.llama_model_free(self.model)
                self.model = None
