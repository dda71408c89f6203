"""The two errors a user sees when lumos refuses a model: it could not be traced, or it could
not be compacted exactly. Both messages name the module or node to blame and what to do."""
from __future__ import annotations


class TraceError(RuntimeError):
    """A model could not be traced; the message names the module and the workaround."""


class CompactionError(RuntimeError):
    """A gated model that lumos cannot compact into an exact plain model; the message names the
    node (or gate) and what to do."""
