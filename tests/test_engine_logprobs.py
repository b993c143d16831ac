"""Log-probabilities from the transformers engine, on the real embedded model: each token's is the model's own
(checked against one plain forward over the prompt and the tokens), from its decoding loop and from generate alike,
and a row whose confidence falls below stop_below ends there."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from thinktime.errors import BadInputError
from thinktime.types import Prompt, SamplingParams

PROMPT = Prompt.of([{"role": "user", "content": "What is 12 + 30? Think step by step."}])


def forward_logprobs(engine, prompt: Prompt, ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward over prompt + ids, at the positions that predicted each of ids."""
    prompt_ids = engine.tokenizer(engine.render(prompt), add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1: -1], dim=-1)


@pytest.fixture
def generate_path(fp32_engine, monkeypatch):
    """The same engine with its decoding loop off: calls go through model.generate, as on a GPU."""
    monkeypatch.setattr(fp32_engine, "decode_loop", False)
    return fp32_engine


def test_each_token_has_the_models_own_log_probability(fp32_engine):
    [[completion]] = fp32_engine.generate([PROMPT], SamplingParams(max_new_tokens=24, logprobs=3))
    entries = completion.logprobs
    assert len(entries) == completion.completion_tokens == 24
    assert [e.id for e in entries] == completion.token_ids
    reference = forward_logprobs(fp32_engine, PROMPT, completion.token_ids)
    for step, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(reference[step, entry.id].item(), abs=1e-3)
        assert [i for i, _, _ in entry.top] == reference[step].topk(3).indices.tolist()
        assert entry.top[0][0] == entry.id  # greedy takes the most likely token
        assert entry.text == fp32_engine.tokenizer.decode([entry.id])
    assert "".join(e.text for e in entries) == completion.text


def test_generate_gives_the_same_log_probabilities_as_the_loop(fp32_engine, generate_path):
    params = SamplingParams(max_new_tokens=12, logprobs=2, n=2, temperature=0.8, seed=7)
    looped = fp32_engine.generate([PROMPT], dataclasses.replace(params, temperature=0.0, n=1))[0][0]
    generated = generate_path.generate([PROMPT], dataclasses.replace(params, temperature=0.0, n=1))[0][0]
    assert generated.token_ids == looped.token_ids
    assert [e.logprob for e in generated.logprobs] == pytest.approx([e.logprob for e in looped.logprobs], abs=1e-4)
    sampled = generate_path.generate([PROMPT], params)[0]
    for completion in sampled:  # sampled rows: the log-probability of what was drawn, under the plain model
        assert len(completion.logprobs) == completion.completion_tokens
        reference = forward_logprobs(generate_path, PROMPT, completion.token_ids)
        assert [e.logprob for e in completion.logprobs] == pytest.approx(
            [reference[s, e.id].item() for s, e in enumerate(completion.logprobs)], abs=1e-3)


@pytest.mark.parametrize("path", ["loop", "generate"])
def test_a_row_below_the_confidence_threshold_ends_there(fp32_engine, monkeypatch, path):
    if path == "generate":
        monkeypatch.setattr(fp32_engine, "decode_loop", False)
    never_sure = SamplingParams(max_new_tokens=30, logprobs=2, stop_below=(4, 1e9), n=2, temperature=0.8, seed=1)
    for completion in fp32_engine.generate([PROMPT], never_sure)[0]:
        assert completion.finish_reason == "low_confidence" and completion.completion_tokens == 4
        assert len(completion.logprobs) == 4
    always_sure = dataclasses.replace(never_sure, stop_below=(4, -1.0))
    for completion in fp32_engine.generate([PROMPT], always_sure)[0]:
        assert completion.finish_reason != "low_confidence" and completion.completion_tokens > 4


def test_nobody_pays_for_log_probabilities_nobody_asked_for(fp32_engine):
    [[completion]] = fp32_engine.generate([PROMPT], SamplingParams(max_new_tokens=4))
    assert completion.logprobs is None


@pytest.mark.parametrize("params, match", [
    (SamplingParams(logprobs=21), "0..20"),
    (SamplingParams(logprobs=-1), "0..20"),
    (SamplingParams(stop_below=(4, 1.0)), "logprobs >= 1"),
    (SamplingParams(logprobs=2, stop_below=(0, 1.0)), "window >= 1"),
])
def test_bad_log_probability_settings_are_refused(fp32_engine, params, match):
    with pytest.raises(BadInputError, match=match):
        fp32_engine.generate([PROMPT], params)
    with pytest.raises(BadInputError, match=match):
        next(fp32_engine.stream(PROMPT, params))
