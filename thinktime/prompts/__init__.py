"""Deep-thinking system prompts, shipped as text files, chosen by the question's language."""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

LANGUAGES = ("en", "zh")

# CJK Unified Ideographs (+ extension A) and CJK punctuation: enough to tell Chinese from English.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]")


def detect_language(text: str) -> str:
    """'zh' when the text holds any CJK character, else 'en'."""
    return "zh" if _CJK.search(text) else "en"


def thinking_prompt(lang: str = "en", max_tokens: int = 8192) -> str:
    """The official InternLM3 thinking system prompt (en) or the InternLM3 tutorial's Chinese one (zh)."""
    if lang not in LANGUAGES:
        from thinktime.errors import BadInputError

        raise BadInputError(f"unknown prompt language {lang!r}", hint=f"use one of {', '.join(LANGUAGES)} or auto")
    text = resources.files(__package__).joinpath(f"think_{lang}.txt").read_text(encoding="utf-8")
    return text.replace("{max_tokens}", str(max_tokens)).strip()


def load_system_prompt(path: str | Path) -> str:
    """A user-provided system prompt file (`--system-prompt FILE`)."""
    p = Path(path)
    if not p.is_file():
        from thinktime.errors import BadInputError

        raise BadInputError(f"system prompt file not found: {p}", hint="pass a path to a UTF-8 text file")
    return p.read_text(encoding="utf-8").strip()
