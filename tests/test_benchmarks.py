"""The benchmarks' own arithmetic, checked against the real model (timings are never asserted)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _engines_benchmark():
    spec = importlib.util.spec_from_file_location("engines_benchmark", ROOT / "benchmarks" / "engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roofline_counts_every_weight_a_step_reads():
    """The roofline's bytes per step are the bytes of every linear layer of the embedded model, the LM head
    (tied to the embeddings) included, as loaded through the real loader."""
    from transformers import AutoModelForCausalLM

    from thinktime import models

    model = AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m").path, dtype=torch.bfloat16)
    linear_bytes = sum(module.weight.numel() * module.weight.element_size()
                       for module in model.modules() if isinstance(module, nn.Linear))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one tensor, read in full by the head
    assert _engines_benchmark().weight_bytes_per_step(model.config, dtype_bytes=2) == linear_bytes
