"""thinktime: turn thinking time into capability."""
from __future__ import annotations

__version__ = "0.1.0"

# How long OpenMP threads spin before they sleep decides how fast torch runs on a few cores. libgomp's
# default (spin ~300k rounds) makes torch many times slower when other processes busy the cores (on 2
# shared cores a 40-token prefill took 3.5 s spinning, 0.3 s passive); never spinning
# (OMP_WAIT_POLICY=PASSIVE) halves decoding speed on idle cores, where a step of a small model is
# hundreds of short parallel regions, each waking a sleeping thread. A short spin keeps both: one
# SmolLM2 decoding step of 8 rows took 26 ms with it and 43-53 ms passive on 2 idle cores, and 71 ms
# with it, 71 ms passive and 97 ms with the default with two busy processes on the same cores
# (docs/performance.md). It only takes effect if torch is not loaded yet, and the user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
import os as _os  # noqa: E402
import sys as _sys  # noqa: E402

if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "10000"

from thinktime.answers import equivalent, extract_answer  # noqa: E402
from thinktime.api import Thinker  # noqa: E402
from thinktime.types import Completion, Event, Prompt, Result, SamplingParams, Usage  # noqa: E402

__all__ = ["Thinker", "Result", "Event", "Prompt", "SamplingParams", "Completion", "Usage",
           "extract_answer", "equivalent", "__version__"]
