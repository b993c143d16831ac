"""thinktime: turn thinking time into capability."""
from __future__ import annotations

__version__ = "0.1.0"

from thinktime.answers import equivalent, extract_answer  # noqa: E402
from thinktime.api import Thinker  # noqa: E402
from thinktime.types import Completion, Event, Prompt, Result, SamplingParams, Usage  # noqa: E402

__all__ = ["Thinker", "Result", "Event", "Prompt", "SamplingParams", "Completion", "Usage",
           "extract_answer", "equivalent", "__version__"]
