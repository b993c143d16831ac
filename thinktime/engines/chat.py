"""What engines that hold a tokenizer share: rendering a Prompt through the chat template, stop tokens.

The transformers engine, the vLLM engine and the OpenAI-compatible engine (when it is given a
local tokenizer) all use these helpers, so that `Prompt.prefix` continues
a partial reply identically everywhere: the chat template with the generation prompt, then the
prefix, tokenized without adding special tokens a second time.
"""
from __future__ import annotations

from thinktime.types import Prompt

# Chat models end a turn with one of these; whichever the tokenizer knows becomes a stop token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<｜end▁of▁sentence｜>")


def render_chat(tokenizer, prompt: Prompt) -> str:
    """The exact text the model sees: the chat template with the generation prompt, then the prefix."""
    messages = list(prompt.messages)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models without a template: a plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return text + prompt.prefix


def stop_token_ids(tokenizer, *extra) -> set[int]:
    """eos ids (tokenizer's and any given, e.g. from generation_config) plus known end-of-turn tokens."""
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), *extra):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple, set)):
            ids.update(int(i) for i in source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return ids
