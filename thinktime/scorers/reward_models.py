"""Outcome and process reward models loaded through transformers, with no remote code.

Supported families, and how each scores a step (a chain is a list of steps):

- qwen-prm (Qwen2.5-Math-PRM-7B/72B; config architecture Qwen2ForProcessRewardModel): the chat
  template with the Qwen math system prompt, the question as the user turn and the steps joined by
  `<extra_0>` (one after each step) as the assistant turn; a two-layer head (`score.0`, ReLU,
  `score.2`) gives two logits per token, and a step's score is softmax(logits)[1] at its
  `<extra_0>` token. The head is read from the checkpoint, so no `trust_remote_code` is needed.
- skywork-prm (Skywork-o1-Open-PRM-Qwen-2.5-1.5B/7B; recognised by its `v_head.summary` weights):
  BOS + question + "\\n", then each step followed by "\\n"; a linear value head (`v_head.summary`)
  gives one logit per token, and a step's score is sigmoid(logit) at the "\\n" that ends it.
- rlhflow-prm (RLHFlow Llama3.1-8B-PRM-Deepseek-Data / -Mistral-Data; a plain causal LM): a
  conversation where the first user turn is question + " " + step 1, each later user turn is the
  next step, and every assistant turn is "+"; a step's score is P("+") / (P("+") + P("-")) for the
  assistant token that follows it.
- thinktime-prm / thinktime-ppm (folders `thinktime train prm|ppm` wrote; they hold thinktime-reward.json): the
  layout of thinktime.scorers.step_encoding; a PRM step's score is softmax(logits)[1] at the delimiter after
  it, a PPM step's is sigmoid of the scalar head at the step's last token (every prefix in one forward pass).
- orm (any `*ForSequenceClassification` reward model, e.g. Skywork-Reward-Llama-3.1-8B): question
  and the whole chain as a chat; the chain's single score is sigmoid(logit).

Spec strings: `prm:PATH` (family detected from the checkpoint), `orm:PATH`, or the family by name
(`qwen-prm:PATH`, `skywork-prm:PATH`, `rlhflow-prm:PATH`). PATH is a local folder or a hub id.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from thinktime.errors import BadInputError
from thinktime.scorers.base import Scorer
from thinktime.scorers.step_encoding import encode_steps, read_reward_info

FAMILIES = ("qwen-prm", "skywork-prm", "rlhflow-prm", "thinktime-prm", "thinktime-ppm", "orm")
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_STEP_TOKEN = "<extra_0>"
_BATCH = 8  # chains per forward pass


def parse_spec(spec: str) -> tuple[str, str]:
    """(family or "prm" to detect, path) from a spec string like "prm:/models/Qwen2.5-Math-PRM-7B"."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in (*FAMILIES, "prm") or not path:
        raise BadInputError(f"unknown scorer {spec!r}",
                            hint="use self, prm:PATH, orm:PATH, or FAMILY:PATH with FAMILY one of "
                                 + ", ".join(FAMILIES))
    return kind, path


def load_reward_model(spec: str, *, device: str | None = None, dtype: str | None = None,
                      source: str | None = None) -> Scorer:
    from thinktime import models
    from thinktime.engines.device import pick_device, pick_dtype

    kind, name = parse_spec(spec)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        path = models.resolve(name, source=source).path
    config = json.loads((path / "config.json").read_text())
    family = detect_family(path, config) if kind == "prm" else kind
    if kind == "prm" and family == "orm":
        raise BadInputError(f"{name} is an outcome reward model (sequence classifier), not a PRM",
                            hint=f"use orm:{name}")
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device, sum(f.stat().st_size for f in path.glob("*.safetensors")))
    cls = {"qwen-prm": QwenMathPRM, "skywork-prm": SkyworkPRM, "rlhflow-prm": RLHFlowPRM,
           "thinktime-prm": ThinktimePRM, "thinktime-ppm": ThinktimePPM, "orm": OutcomeRewardModel}[family]
    return cls(path, device=device, dtype=torch_dtype)


def detect_family(path: Path, config: dict) -> str:
    architectures = config.get("architectures") or []
    trained = read_reward_info(path)
    if trained:
        return f"thinktime-{trained['kind']}"
    if "Qwen2ForProcessRewardModel" in architectures:
        return "qwen-prm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "orm"
    if _weight_names(path, "v_head."):
        return "skywork-prm"
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "rlhflow-prm"
    raise BadInputError(f"cannot tell which reward model family {path} is (architectures: {architectures})",
                        hint=f"name it: {', '.join(f + ':PATH' for f in FAMILIES)}")


def _weight_names(path: Path, prefix: str) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.extend(k for k in f.keys() if k.startswith(prefix))
    return names


def _read_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors whose names start with `prefix`, with the prefix removed."""
    from safetensors import safe_open

    found = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    found[key[len(prefix):]] = f.get_tensor(key)
    if not found:
        raise BadInputError(f"{path} has no weights named {prefix}*: not the reward model family it was taken for",
                            hint="check the path, or name the family explicitly (qwen-prm:, skywork-prm:, ...)")
    return found


def _load_base(path: Path, dtype: torch.dtype, device: str, auto_class):
    """The transformer body of a checkpoint through transformers' own classes (no remote code)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path)
    config.auto_map = {}  # the native class, never the repo's own modelling file
    tokenizer = AutoTokenizer.from_pretrained(path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the heads we load ourselves show up as "unexpected keys"
    try:
        model = auto_class.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(level)
    return tokenizer, model.to(device).eval()


class _TransformersScorer(Scorer):
    def __init__(self, path: Path, *, device: str, dtype: torch.dtype):
        self.path, self.device, self.dtype = path, device, dtype
        self.name = f"{self.family}:{path.name}"

    def score(self, question: str, chains: Sequence[Sequence[str]]) -> list[list[float]]:
        scores: list[list[float]] = []
        for start in range(0, len(chains), _BATCH):
            batch = [self.encode(question, [s for s in steps if s.strip()]) for steps in chains[start:start + _BATCH]]
            scores.extend(self._forward(batch))
        return scores

    def encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids and the positions whose outputs score the steps (one per step)."""
        raise NotImplementedError

    def _forward(self, batch: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Step scores per chain; a chain with no step to score (an empty chain) gets none, without a forward."""
        scored = [i for i, (ids, positions) in enumerate(batch) if ids and positions]
        out: list[list[float]] = [[] for _ in batch]
        if not scored:
            return out
        rows = [batch[i] for i in scored]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(ids) for ids, _ in rows)
        # Right padding keeps every position where encode() put it.
        ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in rows], dtype=torch.long, device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in rows], dtype=torch.long,
                            device=self.device)
        with torch.inference_mode():
            per_token = self.token_scores(ids, mask).float().cpu()
        for k, i in enumerate(scored):
            out[i] = [float(per_token[k, p]) for p in batch[i][1]]
        return out

    def token_scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A score in [0, 1] for every token position, shape (batch, width)."""
        raise NotImplementedError

    def _load_body_and_head(self, path: Path, prefix: str, make_head) -> None:
        """The model without its head, and the head (make_head(hidden size, weights)) from the checkpoint's
        `prefix` weights: no remote code needed for the head."""
        from transformers import AutoModel

        self.tokenizer, self.model = _load_base(path, self.dtype, self.device, AutoModel)
        weights = _read_weights(path, prefix)
        self.head = make_head(self.model.config.hidden_size, weights)
        self.head.load_state_dict(weights)
        self.head.to(device=self.device, dtype=self.dtype).eval()

    def close(self) -> None:
        del self.model


class QwenMathPRM(_TransformersScorer):
    family = "qwen-prm"

    def __init__(self, path: Path, *, device: str, dtype: torch.dtype):
        super().__init__(path, device=device, dtype=dtype)
        self._load_body_and_head(path, "score.", lambda hidden, _: torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)))
        self.step_id = self.tokenizer.convert_tokens_to_ids(QWEN_STEP_TOKEN)
        if self.step_id is None or self.step_id == self.tokenizer.unk_token_id:
            raise BadInputError(f"{path}'s tokenizer has no {QWEN_STEP_TOKEN} token: not a Qwen2.5-Math-PRM")

    def encode(self, question, steps):
        messages = [{"role": "system", "content": QWEN_PRM_SYSTEM}, {"role": "user", "content": question},
                    {"role": "assistant", "content": QWEN_STEP_TOKEN.join(steps) + QWEN_STEP_TOKEN}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids, [i for i, t in enumerate(ids) if t == self.step_id]

    def token_scores(self, ids, mask):
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(hidden).softmax(dim=-1)[..., 1]


class SkyworkPRM(_TransformersScorer):
    family = "skywork-prm"

    def __init__(self, path: Path, *, device: str, dtype: torch.dtype):
        super().__init__(path, device=device, dtype=dtype)
        self._load_body_and_head(path, "v_head.summary.", lambda hidden, _: torch.nn.Linear(hidden, 1))
        self.newline_id = self.tokenizer.encode("\n", add_special_tokens=False)[-1]

    def encode(self, question, steps):
        bos = self.tokenizer.bos_token or ""
        ids = self.tokenizer.encode(bos + question + "\n", add_special_tokens=False)
        positions = []
        for step in steps:
            # A step's own newlines would be read as step ends: Skywork steps are single lines.
            ids += self.tokenizer.encode(" ".join(step.split("\n")), add_special_tokens=False) + [self.newline_id]
            positions.append(len(ids) - 1)
        return ids, positions

    def token_scores(self, ids, mask):
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return torch.sigmoid(self.head(hidden).squeeze(-1))


class RLHFlowPRM(_TransformersScorer):
    family = "rlhflow-prm"

    def __init__(self, path: Path, *, device: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        super().__init__(path, device=device, dtype=dtype)
        self.tokenizer, self.model = _load_base(path, dtype, device, AutoModelForCausalLM)
        self.plus_id = self.tokenizer.encode("+", add_special_tokens=False)[-1]
        self.minus_id = self.tokenizer.encode("-", add_special_tokens=False)[-1]

    def encode(self, question, steps):
        conversation: list[dict[str, str]] = []
        positions = []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": f"{question} {step}" if k == 0 else step})
            # The assistant's "+" comes right after the generation prompt: the logits at the
            # position before it say how likely "+" is.
            asking = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            positions.append(len(self.tokenizer(asking, add_special_tokens=False).input_ids) - 1)
            conversation.append({"role": "assistant", "content": "+"})
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False) if conversation else ""
        return self.tokenizer(text, add_special_tokens=False).input_ids, positions

    def token_scores(self, ids, mask):
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits[..., [self.plus_id, self.minus_id]].float().softmax(dim=-1)[..., 0]


class ThinktimePRM(_TransformersScorer):
    family = "thinktime-prm"

    def __init__(self, path: Path, *, device: str, dtype: torch.dtype):
        from transformers import AutoModelForTokenClassification

        super().__init__(path, device=device, dtype=dtype)
        self.tokenizer, self.model = _load_base(path, dtype, device, AutoModelForTokenClassification)
        self.delimiter = read_reward_info(path)["delimiter"]

    def encode(self, question, steps):
        ids, _, separators = encode_steps(self.tokenizer, question, steps, self.delimiter)
        return ids, separators

    def token_scores(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).logits.float().softmax(dim=-1)[..., 1]


class ThinktimePPM(_TransformersScorer):
    """The body and scalar head of a sequence classifier, run apart: its own forward reads only the last token."""

    family = "thinktime-ppm"

    def __init__(self, path: Path, *, device: str, dtype: torch.dtype):
        super().__init__(path, device=device, dtype=dtype)
        self._load_body_and_head(path, "score.", lambda hidden, weights: torch.nn.Linear(hidden, 1,
                                                                                          bias="bias" in weights))
        self.delimiter = read_reward_info(path)["delimiter"]

    def encode(self, question, steps):
        ids, ends, _ = encode_steps(self.tokenizer, question, steps, self.delimiter)
        return ids, ends

    def token_scores(self, ids, mask):
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return torch.sigmoid(self.head(hidden).squeeze(-1))


class OutcomeRewardModel(_TransformersScorer):
    family = "orm"
    per_step = False

    def __init__(self, path: Path, *, device: str, dtype: torch.dtype):
        from transformers import AutoModelForSequenceClassification

        super().__init__(path, device=device, dtype=dtype)
        self.tokenizer, self.model = _load_base(path, dtype, device, AutoModelForSequenceClassification)
        if self.model.config.pad_token_id is None:  # sequence classifiers find the last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

    def encode(self, question, steps):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "\n\n".join(steps)}]
        ids = self.tokenizer.apply_chat_template(messages, tokenize=False)
        ids = self.tokenizer(ids, add_special_tokens=False).input_ids
        return ids, [len(ids) - 1]

    def _forward(self, batch):
        scores = []
        for ids, _ in batch:  # one at a time: the classifier reads the last non-pad token
            with torch.inference_mode():
                logit = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, 0]
            scores.append([float(torch.sigmoid(logit.float()))])
        return scores
