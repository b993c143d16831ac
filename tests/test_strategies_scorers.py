"""Reward model code paths on tiny randomly initialised models of each family's architecture, built here.

No download: each checkpoint is written with the real family's layout (weight names, config
architecture, step token), so loading, family detection and step alignment are what is tested.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from strategy_doubles import ScriptedEngine

from thinktime import models
from thinktime.errors import BadInputError
from thinktime.scorers.reward_models import load_reward_model
from thinktime.strategies import Budget, Context, get_strategy
from thinktime.types import Prompt, SamplingParams

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
CHAINS = [["Add 2 and 3.", "That gives 5.", "So \\boxed{5}."], ["Add 2 and 3.", "That gives 5.", "No, 6."]]


def _tokenizer(extra=()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m").path)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


def _save(folder, tok, config, state):
    folder.mkdir()
    tok.save_pretrained(folder)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen2Config,
                              Qwen2ForCausalLM, Qwen2Model)

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("reward-models")
    out = {}
    tok = _tokenizer(["<extra_0>"])
    config = Qwen2Config(vocab_size=len(tok), architectures=["Qwen2ForProcessRewardModel"],
                         auto_map={"AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}, **TINY)
    state = {f"model.{k}": v for k, v in Qwen2Model(config).state_dict().items()}
    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    state.update({f"score.{k}": v for k, v in head.state_dict().items()})
    out["qwen-prm"] = _save(root / "qwen-prm", tok, config, state)

    tok = _tokenizer()
    config = Qwen2Config(vocab_size=len(tok), architectures=["Qwen2ForPrmModel"], **TINY)
    state = dict(Qwen2ForCausalLM(config).state_dict())
    state.update({"v_head.summary.weight": torch.randn(1, 32), "v_head.summary.bias": torch.zeros(1)})
    out["skywork-prm"] = _save(root / "skywork-prm", tok, config, state)

    config = LlamaConfig(vocab_size=len(tok), architectures=["LlamaForCausalLM"], **TINY)
    out["rlhflow-prm"] = _save(root / "rlhflow-prm", tok, config, dict(LlamaForCausalLM(config).state_dict()))

    config = LlamaConfig(vocab_size=len(tok), num_labels=1, architectures=["LlamaForSequenceClassification"],
                         pad_token_id=tok.pad_token_id, **TINY)
    out["orm"] = _save(root / "orm", tok, config, dict(LlamaForSequenceClassification(config).state_dict()))
    return out


@pytest.mark.parametrize("family", ["qwen-prm", "skywork-prm", "rlhflow-prm"])
def test_prm_scores_each_step_where_it_ends(checkpoints, family):
    scorer = load_reward_model(f"prm:{checkpoints[family]}", device="cpu")
    assert scorer.family == family  # detected from the checkpoint
    scores = scorer.score("What is 2 + 3?", CHAINS)
    assert [len(s) for s in scores] == [3, 3]
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)
    # a step's score depends only on the steps up to it: the shared first two steps score alike
    assert scores[0][:2] == pytest.approx(scores[1][:2], abs=1e-5)
    assert scores[0][2] != pytest.approx(scores[1][2], abs=1e-7)
    # padding in a batch changes nothing
    alone = scorer.score("What is 2 + 3?", [CHAINS[0][:1]])
    batched = scorer.score("What is 2 + 3?", [CHAINS[0][:1], CHAINS[1]])
    assert alone[0] == pytest.approx(batched[0], abs=1e-5)


def test_orm_scores_the_whole_chain(checkpoints):
    scorer = load_reward_model(f"orm:{checkpoints['orm']}", device="cpu")
    scores = scorer.score("What is 2 + 3?", CHAINS)
    assert [len(s) for s in scores] == [1, 1] and scores[0] != scores[1]
    with pytest.raises(BadInputError, match="outcome reward model"):
        load_reward_model(f"prm:{checkpoints['orm']}", device="cpu")


def test_bad_scorer_specs_are_refused(checkpoints):
    with pytest.raises(BadInputError, match="unknown scorer"):
        load_reward_model("judge:/nowhere")
    with pytest.raises(BadInputError, match="no weights named"):
        load_reward_model(f"skywork-prm:{checkpoints['rlhflow-prm']}", device="cpu")


def test_best_of_n_with_a_prm(checkpoints):
    texts = iter(["Add 2 and 3.\n\nThat gives 5.\n\nSo \\boxed{5}.", "Add 2 and 3.\n\nNo, \\boxed{6}.", "\\boxed{7}"])
    engine = ScriptedEngine(lambda prompt, k: next(texts))
    ctx = Context("What is 2 + 3?", Prompt.of([{"role": "user", "content": "What is 2 + 3?"}]), engine,
                  SamplingParams(max_new_tokens=40), Budget(None),
                  options={"n": 3, "scorer": f"prm:{checkpoints['qwen-prm']}", "aggregate": "min"})
    result = get_strategy("best-of-n")(ctx)
    scores = result.details["scores"]
    assert result.answer == result.candidates[max(range(3), key=lambda i: (scores[i], -i))].answer
    assert [len(s) for s in result.details["step_scores"]] == [3, 2, 1]
    assert result.details["scorer"].startswith("qwen-prm:")


@pytest.mark.parametrize("family", ["qwen-prm", "skywork-prm", "rlhflow-prm", "orm"])
def test_empty_chains_are_scored_without_a_crash(checkpoints, family):
    # A model that ends its turn at once gives an empty chain; a batch of only those used to crash the
    # PRM (an empty id list made a float tensor).
    kind = "orm" if family == "orm" else "prm"
    scorer = load_reward_model(f"{kind}:{checkpoints[family]}", device="cpu")
    alone = scorer.score("What is 2 + 3?", [[""], []])
    assert all(len(s) <= 1 for s in alone)
    mixed = scorer.score("What is 2 + 3?", [[""], CHAINS[0]])
    assert len(mixed[1]) == (1 if family == "orm" else 3)
    engine = ScriptedEngine(lambda prompt, k: "")
    ctx = Context("What is 2 + 3?", Prompt.of([{"role": "user", "content": "What is 2 + 3?"}]), engine,
                  SamplingParams(max_new_tokens=8), Budget(None), options={"n": 2, "scorer": scorer})
    result = get_strategy("best-of-n")(ctx)
    assert result.answer is None and len(result.candidates) == 2
