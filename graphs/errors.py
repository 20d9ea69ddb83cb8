"""Errors raised by graphs/. All are ValueError subclasses so callers can catch one type."""

from __future__ import annotations


class GraphsError(ValueError):
    """Base class: something about the model or its description was wrong."""


class TraceError(GraphsError):
    """The model could not be turned into a dataflow graph."""


class UnknownModelError(GraphsError):
    """A model name that is neither a zoo preset, a spec, an hf: path nor a file.py:factory."""


class SpecError(GraphsError):
    """A malformed model spec string or an inconsistent model config."""
