"""thinktime: turn thinking time into capability."""
from __future__ import annotations

__version__ = "0.1.0"

# OpenMP threads that spin while waiting (libgomp's default) make torch on a busy CPU many times
# slower: on 2 shared cores a 40-token prefill took 3.5 s spinning and 0.3 s passive (README
# "Performance"). Passive waiting is the default here unless the user chose otherwise; it only
# takes effect if torch is not loaded yet.
import os as _os  # noqa: E402
import sys as _sys  # noqa: E402

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from thinktime.answers import equivalent, extract_answer  # noqa: E402
from thinktime.api import Thinker  # noqa: E402
from thinktime.types import Completion, Event, Prompt, Result, SamplingParams, Usage  # noqa: E402

__all__ = ["Thinker", "Result", "Event", "Prompt", "SamplingParams", "Completion", "Usage",
           "extract_answer", "equivalent", "__version__"]
