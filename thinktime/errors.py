"""Errors that reach users: each says what went wrong and what to do, and maps to an exit code."""
from __future__ import annotations


class ThinktimeError(Exception):
    """Base error. `hint` tells the user what to do next; `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class BadInputError(ThinktimeError):
    """The user's input (question, file, option) is not usable."""

    exit_code = 2


class ModelNotFoundError(ThinktimeError):
    """A model name is neither an alias, a local path, a .gguf file nor a hub repo id we can reach."""

    exit_code = 3


class DownloadError(ThinktimeError):
    """A download from ModelScope or the Hugging Face hub failed."""

    exit_code = 4


class InsufficientMemoryError(ThinktimeError):
    """The model cannot fit in the memory of this machine."""

    exit_code = 5


class EngineError(ThinktimeError):
    """An inference engine or model server failed: unreachable, refused the request, or broke off."""

    exit_code = 6


# Exit codes documented in docs/troubleshooting.md; 130 is the shell's convention for Ctrl-C.
EXIT_OK = 0
EXIT_INTERRUPTED = 130
