"""The engine protocol: what every strategy may ask of a model, and nothing about answers."""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

from thinktime.errors import BadInputError
from thinktime.types import Completion, Prompt, SamplingParams, StreamDelta


class Engine(ABC):
    name: str = "engine"
    model_name: str = ""
    #: the longest prompt + completion the model takes, when known
    context_length: int | None = None
    #: a device label for messages and defaults ("cpu", "cuda")
    device: str = "cpu"

    @abstractmethod
    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees: chat template with generation prompt, then the prefix."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens in `text` under this model's tokenizer (no special tokens added)."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams,
                 cancel: threading.Event | None = None) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order, in as few model calls as possible."""

    def stream(self, prompt: Prompt, params: SamplingParams,
               cancel: threading.Event | None = None) -> Iterator[StreamDelta]:
        """Text as it is generated. Engines that cannot stream yield each whole completion once."""
        for index, completion in enumerate(self.generate([prompt], params, cancel)[0]):
            yield StreamDelta(index, completion.text, completion)

    def close(self) -> None:
        """Release the model's memory."""


def refuse_logprobs(engine: Engine, params: SamplingParams) -> None:
    """Engines that do not return log-probabilities say so before generating anything."""
    if params.logprobs is not None or params.stop_below is not None:
        raise BadInputError(f"the {engine.name} engine does not return log-probabilities",
                            hint="the transformers and llamacpp engines return log-probabilities (--engine)")
