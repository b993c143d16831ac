"""Log-probability settings checked before any engine generates (no torch here: the llama.cpp,
vLLM and OpenAI engines import it, and a CPU process that never loads torch starts a second sooner)."""
from __future__ import annotations

from thinktime.errors import BadInputError
from thinktime.types import SamplingParams

MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's API allows


def check_logprob_params(params: SamplingParams) -> None:
    """Log-probability settings no engine can serve, refused before anything is generated."""
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise BadInputError(f"logprobs must be 0..{MAX_TOP_LOGPROBS} alternatives per token, got {params.logprobs}")
    if params.stop_below is not None and (not params.logprobs or params.stop_below[0] < 1):
        raise BadInputError("stopping on low confidence reads the top log-probabilities over a window of at least "
                            "one token: set logprobs >= 1 and a window >= 1")
