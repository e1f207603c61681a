"""User-facing errors. The CLI prints them as one line; the HTTP layer maps them to Anthropic errors."""

from __future__ import annotations


class KawaiError(Exception):
    """An error a user can act on; `str(e)` is one clear line without file-system internals."""

    exit_code = 1


class ModelNotFoundError(KawaiError):
    """A model id or path that is neither local, nor in the catalog."""


class ContextLengthError(KawaiError):
    """A prompt (plus max_tokens) that does not fit the model's context window."""
