"""Which models and generation settings the fast decoder (engines/fast.py) serves, and how it says it cannot."""
from __future__ import annotations

# Model types whose decoder layers are Llama's (RMSNorm, rotary q/k, GQA attention, SiLU-gated MLP).
SUPPORTED_TYPES = ("llama", "internlm3", "qwen2", "qwen3", "mistral")
# RoPE variants whose tables depend only on the position (dynamic/longrope: within the original length).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
LENGTH_ROPE = ("dynamic", "longrope")
# Generation-config settings that `generate` would apply and this decoder does not.
_UNSUPPORTED_GEN = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
                    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
                    "min_new_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                    "min_p": None, "renormalize_logits": False}


class FastPathUnavailable(RuntimeError):
    """The fast path cannot serve this call; `permanent` means it never will on this model/device."""

    def __init__(self, reason: str, permanent: bool = False):
        super().__init__(reason)
        self.permanent = permanent


def base_model(model):
    return getattr(model, getattr(model, "base_model_prefix", "model"), None)


def unsupported_reason(model) -> str | None:
    """Why this decoder cannot run `model` (None when it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "?")
    if kind not in SUPPORTED_TYPES:
        return f"model type {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (only silu)"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "sliding-window attention layers"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", kind == "mistral"):
        return "sliding-window attention"
    base = base_model(model)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "embed_tokens") or not hasattr(model, "lm_head"):
        return "not a decoder with model.layers, embed_tokens and lm_head"
    rope = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
    if rope is None:
        return "no rotary embedding module"
    if rope not in _STATIC_ROPE + LENGTH_ROPE:
        return f"rope type {rope!r}"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without q/k/v/o and gate/up/down projections"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return f"parameters on {len(devices)} devices (offloaded or split models are not supported)"
    if any(getattr(cfg, name, None) for name in ("final_logit_softcapping", "attn_logit_softcapping")):
        return "logit soft-capping"
    return None


def generation_config_blocker(generation_config) -> str | None:
    """A generation-config setting that `generate` would honour and this decoder would not."""
    if generation_config is None:
        return None
    for name, neutral in _UNSUPPORTED_GEN.items():
        value = getattr(generation_config, name, neutral)
        if value not in (neutral, None) and not (isinstance(value, (list, tuple, dict)) and not value):
            return f"generation_config.{name}={value!r}"
    return None
