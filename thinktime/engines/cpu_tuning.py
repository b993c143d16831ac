"""Which CPU decoding kernels win on this machine: timed once per CPU, torch version and model shape.

Why: the CPU path's hand-tuned pieces (oneDNN-packed linears, bf16, one-query decode attention, the
shared-prefix cache, the lean step) were tuned on an AMD Zen 5 with AVX512-BF16; on a Xeon without it
they decoded slower than plain generate. So a few one-token steps at 1 and 8 rows over a cached prompt
are timed with each candidate and with the plain setting (fp32, nn.Linear, sdpa, the model's forward),
a piece is used only where it is clearly faster, and the verdict is kept in THINKTIME_HOME/cpu-tuning.json.
THINKTIME_ONEDNN and THINKTIME_LEAN_STEP still force their piece (and an explicit dtype is obeyed);
THINKTIME_CPU_TUNING=0 times nothing and keeps the hand-tuned defaults, =refresh times again.
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import statistics
import time
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, DynamicCache

from thinktime import models
from thinktime.engines import cpu_attention, onednn
from thinktime.engines.decode_rows import env_flag
from thinktime.engines.growing_cache import growing
from thinktime.engines.lean_step import LeanStep
from thinktime.engines.prefix_cache import cache_kwarg
from thinktime.engines.shared_prefix import shared_prefix_cache
from thinktime.engines.timed_verdicts import cpu_model_and_flags, read_verdicts, write_verdict

log = logging.getLogger(__name__)

CACHE_FILE = "cpu-tuning.json"
PIECES = ("onednn", "decode_attention", "shared_prefix", "lean_step")
PROMPT_TOKENS = 160  # cached positions each timed step attends to (a short chat prompt)
ROWS = (1, 8)  # one chain, and n samples of one question
WARM_UP, STEPS = 1, 4  # one-token steps per setting and row count: the first creates oneDNN primitives, untimed
BUDGET_S = 4.0  # past this, a race ends after its first timed step (a big model, a busy CPU)
MARGIN = 0.97  # a setting beats the plain one if >= 3% faster, and at no row count 3% slower: noise keeps plain
BUSY = 0.25  # other processes took more of our CPUs while timing: the verdict serves this load, is not cached
_FORCING_ENV = {"onednn": "THINKTIME_ONEDNN", "lean_step": "THINKTIME_LEAN_STEP"}
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def cpu_name() -> str:
    """The CPU's model name, what torch dispatches to, and the instruction sets that decide which kernels win."""
    name, flags = cpu_model_and_flags()
    return " ".join([name, torch.backends.cpu.get_cpu_capability(), *sorted(flags & set(_FLAGS))])


def forced(dtype: torch.dtype | None) -> dict:
    """The settings fixed before timing: a dtype (asked for, or the only one that fits) and the env flags."""
    fixed = {} if dtype is None else {"dtype": _NAMES.get(dtype, str(dtype))}
    for piece, env in _FORCING_ENV.items():
        if os.environ.get(env, "").strip():
            fixed[piece] = env_flag(env, True)
    return fixed


def cache_key(config, fixed: dict) -> str:
    """This CPU, its threads, torch and the model's shape, with the settings fixed before timing."""
    shape = " ".join(f"{name} {getattr(config, name, None)}" for name in (
        "model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads"))
    settings = " ".join(f"{key}={value}" for key, value in sorted(fixed.items())) or "auto"
    return f"{cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | {shape} | {settings}"


def read_cache() -> dict:
    return read_verdicts(CACHE_FILE)


def write_cache(key: str, verdict: dict) -> None:
    write_verdict(CACHE_FILE, key, {k: v for k, v in verdict.items() if k not in ("source", "forced")})


def cached(key: str, fixed: dict) -> dict | None:
    verdict = read_cache().get(key)
    if not isinstance(verdict, dict) or verdict.get("dtype") not in DTYPES or \
            not all(isinstance(verdict.get(piece), bool) for piece in PIECES):
        return None  # another version's entry, or edited by hand
    return {**verdict, "source": "cached", "forced": sorted(fixed)}


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The parameters in `dtype`, buffers (rotary tables) kept: the model from_pretrained(dtype=...) gives."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    model.config.dtype = dtype
    return model


class Setting(NamedTuple):
    """One way to run the decoding steps; the plain one is fp32 with every piece off."""
    dtype: str
    onednn: bool = False
    decode_attention: bool = False
    shared_prefix: bool = False
    lean_step: bool = False

    def label(self) -> str:
        return " ".join([self.dtype, *(piece for piece in PIECES if getattr(self, piece))])


def _options(piece: str, fixed: dict, available: bool) -> tuple[bool, ...]:
    """The values of a piece to time, off first."""
    return (fixed[piece] and available,) if piece in fixed else (False, True) if available else (False,)


def measure(model, dtypes: list[torch.dtype], fixed: dict, decode_loop: bool) -> dict:
    """The fastest setting for `model` (left untouched), in two races from the plain one: dtype x oneDNN, then for
    the winner the decode attention, and the shared-prefix cache with or without the lean step."""
    started, ours, everyone = time.perf_counter(), time.process_time(), _busy_seconds()
    deadline, kv = started + BUDGET_S, _prompt_kv(model.config)
    sdpa = model.config._attn_implementation == "sdpa"  # what cpu_attention.use_for switches from
    variants = _variants(model, dtypes, fixed)
    linear = [Setting(dtype, packed) for dtype, packed in variants]
    races = [_race(variants, linear, kv, deadline)]
    best = _pick(races[0], linear[0])
    if sdpa:
        decode = best._replace(decode_attention=True)
        lean = _options("lean_step", fixed, LeanStep.unavailable_reason(model) is None)
        shared = [decode._replace(shared_prefix=True, lean_step=option) for option in lean] if decode_loop else []
        races.append(_race(variants, [best, decode, *shared], kv, deadline))
        single = _pick({setting: races[1][setting] for setting in (best, decode)}, best)
        best = _pick({setting: races[1][setting] for setting in (single, *shared)}, single)
        best = best._replace(decode_attention=single.decode_attention)  # for steps without a shared prefix
    seconds, others = time.perf_counter() - started, None
    if everyone is not None and (now := _busy_seconds()) is not None:  # other processes' CPU time, per CPU
        others = round((now - everyone - (time.process_time() - ours)) / seconds / len(os.sched_getaffinity(0)), 2)
    return {**best._asdict(), "seconds": round(seconds, 2), "others_cpu": others,
            "ms": [{setting.label(): [round(t * 1000, 1) for t in pair] for setting, pair in race.items() if pair}
                   for race in races]}


def _variants(model, dtypes: list[torch.dtype], fixed: dict) -> dict:
    """(dtype name, packed) -> a copy of the model over the same parameters (cast, or packed, where it differs)."""
    variants = {}
    for dtype in dtypes:
        base = _copy(model, dtype)
        for packed in _options("onednn", fixed, onednn.unavailable_reason(model) is None):
            variant = _copy(base, dtype) if packed else base
            if not packed or onednn.pack_linears(variant):  # 0: the kernels failed their check here
                variants[(_NAMES[dtype], packed)] = variant
    return variants


def _copy(model, dtype: torch.dtype):
    """Another module tree over the same parameters (cast where dtype differs): packing it or switching its
    attention leaves `model` alone, and costs only what it replaces."""
    memo = {id(p): p if p.dtype == dtype else nn.Parameter(p.data.to(dtype), requires_grad=False)
            for p in model.parameters()}
    twin = copy.deepcopy(model, memo)
    twin.config.dtype = dtype
    return twin


def _pick(times: dict, plain: Setting) -> Setting:
    """The fastest setting (geometric mean of its 1-row and 8-row steps) of those no slower than plain at either
    row count (a piece that wins at 8 rows but loses one chain is not used); plain unless it wins by MARGIN."""
    base = times.get(plain)
    scores = {setting: (pair[0] * pair[1]) ** 0.5 for setting, pair in times.items()
              if pair and (base is None or all(t * MARGIN <= b for t, b in zip(pair, base)))}
    best = min(scores, key=scores.get)
    return best if base is None or scores[best] < MARGIN * scores[plain] else plain


class _Run:
    """One setting decoding `rows` rows a token at a time over a cached prompt, as decode_loop does."""

    def __init__(self, model, setting: Setting, rows: int, kv, lean):
        self.model, self.setting, self.rows, self.lean = model, setting, rows, lean
        self.attention = cpu_attention.ATTENTION_NAME if setting.decode_attention or setting.shared_prefix else "sdpa"
        self.kwarg, self.cache = cache_kwarg(model), _cache(model, kv, rows, setting.shared_prefix)
        self.tokens = torch.randint(100, 1000, (rows, 1), generator=torch.Generator().manual_seed(rows))
        self.mask, self.times = torch.ones(rows, PROMPT_TOKENS, dtype=torch.long), []

    def step(self) -> float:
        if self.model.config._attn_implementation != self.attention:  # variants are shared: switched untimed
            self.model.set_attn_implementation(self.attention)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        positions = torch.full((self.rows, 1), self.mask.shape[1] - 1)
        started = time.perf_counter()
        if self.lean is not None:
            logits = self.lean(self.tokens, positions, self.cache, None)
        else:
            logits = self.model(input_ids=self.tokens, attention_mask=self.mask, position_ids=positions,
                                use_cache=True, **{self.kwarg: self.cache}).logits[:, -1]
        self.tokens = logits.argmax(-1, keepdim=True)
        return time.perf_counter() - started


def _race(variants: dict, settings: list[Setting], kv, deadline: float) -> dict:
    """(1-row, 8-row) median step seconds per setting, None where it cannot run. The settings take their steps
    in turn, so that a busy moment of the machine falls on all alike; a setting 3x slower than the fastest
    after its first timed step has lost and stops there."""
    cpu_attention.register()
    runs, lost, leans = [], [], {}
    for setting in settings:
        model = variants[(setting.dtype, setting.onednn)]
        if setting.lean_step and id(model) not in leans:
            leans[id(model)] = LeanStep(model)
        lean = leans[id(model)] if setting.lean_step else None
        runs += [run for rows in ROWS if (run := _Run(model, setting, rows, kv, lean)).cache is not None]
    with torch.inference_mode():
        for step in range(WARM_UP + STEPS):
            for run in runs:
                seconds = run.step()
                if step >= WARM_UP:
                    run.times.append(seconds)
            if step >= WARM_UP and time.perf_counter() > deadline:
                break
            if step == WARM_UP:
                fastest = {rows: min(run.times[0] for run in runs if run.rows == rows) for rows in ROWS}
                lost += [run for run in runs if run.times[0] >= 3 * fastest[run.rows]]
                runs = [run for run in runs if run.times[0] < 3 * fastest[run.rows]]
    medians = {}
    for run in runs + lost:
        medians.setdefault(run.setting, {})[run.rows] = statistics.median(run.times)
    return {setting: tuple(medians[setting][rows] for rows in ROWS) if len(medians.get(setting, ())) == len(ROWS)
            else None for setting in settings}


def _busy_seconds() -> float | None:
    """CPU seconds spent so far on the CPUs this process may use, by every process (Linux; None elsewhere)."""
    try:
        cpus, busy = {f"cpu{i}" for i in os.sched_getaffinity(0)}, 0
        with open("/proc/stat") as f:
            for fields in map(str.split, f):
                if fields and fields[0] in cpus:
                    ticks = [int(value) for value in fields[1:]]
                    busy += sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait (steal counts: not ours)
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        return None


def _prompt_kv(config) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random keys and values of a prompt per layer, [1, kv heads, PROMPT_TOKENS, dim]: timing needs no real ones."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    generator = torch.Generator().manual_seed(0)
    return [tuple(torch.randn(1, kv_heads, PROMPT_TOKENS, dim, generator=generator) for _ in range(2))
            for _ in range(config.num_hidden_layers)]


def _cache(model, kv, rows: int, shared: bool):
    """The prompt's cache as the engine builds it: a growing cache per row, or one shared prefix (None: not here)."""
    prefix, copies = DynamicCache(config=model.config), 1 if shared else rows
    for layer, (keys, values) in zip(prefix.layers, kv):
        layer.update(keys.to(model.dtype).expand(copies, -1, -1, -1), values.to(model.dtype).expand(copies, -1, -1, -1))
    return shared_prefix_cache(prefix, model.config) if shared else growing(prefix)


class Tuning:
    """The CPU kernels of one engine load: the defaults (THINKTIME_CPU_TUNING=0, or where nothing can be timed),
    the cached verdict, or one timed on the loaded model."""

    def __init__(self, config, dtype: torch.dtype | None, default_dtype: torch.dtype, fp32_fits: bool,
                 measurable: bool = True):
        """dtype: the one asked for, or None for auto (fp32 against bf16, where fp32 fits); default_dtype: auto's
        choice without timing."""
        self.dtypes = [torch.float32, torch.bfloat16] if dtype is None and fp32_fits else [dtype or default_dtype]
        self.fixed = forced(self.dtypes[0] if len(self.dtypes) == 1 else None)
        self.key = cache_key(config, self.fixed)
        self.default_dtype = _NAMES.get(default_dtype, "fp32")
        self.verdict = None
        if not env_flag("THINKTIME_CPU_TUNING", True):
            self.verdict = self._defaults("env")
        elif not measurable:
            self.verdict = self._defaults("default")
        elif os.environ.get("THINKTIME_CPU_TUNING", "").strip().lower() != "refresh":
            self.verdict = cached(self.key, self.fixed)

    @property
    def load_dtype(self) -> torch.dtype:
        """The dtype to load the model in: the verdict's, or the first to time (the others are cast from it)."""
        return DTYPES[self.verdict["dtype"]] if self.verdict else self.dtypes[0]

    def settle(self, model, decode_loop: bool) -> dict:
        """The verdict, timed on `model` (loaded in load_dtype) where nothing gave one; logged once."""
        if self.verdict is None:
            self.verdict = self._measured(model, decode_loop)
        verdict = self.verdict
        where = {"measured": f"timed in {verdict.get('seconds')} s", "env": "THINKTIME_CPU_TUNING=0, the defaults",
                 "cached": f"cached in {models.home() / CACHE_FILE}"}.get(verdict["source"], "the defaults")
        log.info("thinktime CPU kernels (%s; %s): %s, %s", cpu_name(), where, verdict["dtype"],
                 ", ".join(f"{piece} {'on' if verdict[piece] else 'off'}" for piece in PIECES))
        return verdict

    def _measured(self, model, decode_loop: bool) -> dict:
        copies = sum(p.numel() for p in model.parameters()) * 4 * len(self.dtypes)  # the most measure's copies hold
        if copies > 0.5 * models.available_memory("cpu")[0]:
            return self._defaults("default")
        try:
            verdict = measure(model, self.dtypes, self.fixed, decode_loop)
        except Exception as exc:  # noqa: BLE001 - a timing that fails only means "keep the defaults"
            log.warning("thinktime: timing the CPU kernels failed (%s); using the defaults", exc)
            return self._defaults("default")
        finally:
            gc.collect()  # the copies measure made
        if verdict["others_cpu"] is None or verdict["others_cpu"] <= BUSY:
            write_cache(self.key, verdict)
        else:
            log.info("thinktime: other processes took %d%% of the CPUs while its kernels were timed; the verdict "
                     "serves this load and is not kept", 100 * verdict["others_cpu"])
        return {**verdict, "source": "measured", "forced": sorted(self.fixed)}

    def _defaults(self, source: str) -> dict:
        return {"dtype": self.default_dtype, **{piece: self.fixed.get(piece, True) for piece in PIECES},
                "source": source, "forced": sorted(self.fixed)}


def for_load(device: str, path, asked: torch.dtype | None, default_dtype: torch.dtype, fp32_fits: bool,
             trust_remote_code: bool, fast: bool | None) -> Tuning | None:
    """On the CPU, where this machine's verdict on a model's kernels comes from (None on a GPU); a model with remote
    code, or the fast decoder asked for, keeps the defaults. `asked`: the dtype asked for, None for auto."""
    if device != "cpu":
        return None
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return Tuning(config, asked, default_dtype, fp32_fits, measurable=not trust_remote_code and not fast)


def settle(tuning: Tuning | None, model, trust_remote_code: bool) -> dict | None:
    """The verdict (measured now on the loaded model if nothing gave one), the model cast to its dtype."""
    if tuning is None:
        return None
    kernels = tuning.settle(model, decode_loop=not trust_remote_code)
    if model.dtype != DTYPES[kernels["dtype"]]:  # bf16 won, timed on the fp32 load: as from_pretrained would cast it
        cast_parameters(model, DTYPES[kernels["dtype"]])
    return kernels
