"""Values derived from tensors (a graph's validation, its index plans), kept while the tensors live unchanged.

A graph is usually reused for many steps (a layer caches its CSR), so what is derived from it
(checks that need a host sync, index arrays for the kernels) is computed once. Entries are
keyed on tensor identity (weakly: they go when the tensor goes) and stamped with the in-place
version counters of every tensor they were derived from. A value must not hold a reference
to its key tensor (the entry would then never be freed).
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

V = TypeVar("V")

_STORE = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter: never remembered
        return None


def _stamp(key: torch.Tensor, sources: tuple) -> tuple | None:
    versions = [_version(key)] + [_version(t) for t in sources]
    return None if None in versions else tuple(versions)


def remembered(key: torch.Tensor, tag: Hashable, compute: Callable[[], V], *sources: torch.Tensor) -> V:
    """``compute()``, or the value remembered for ``(key, tag)`` while ``key`` and ``sources``
    are the same tensors with the same in-place versions as when it was computed."""
    entries = _STORE.get(key)
    hit = entries.get(tag) if entries is not None else None
    stamp = _stamp(key, sources)
    if hit is not None and stamp is not None and hit[0] == stamp \
            and all(ref() is t for ref, t in zip(hit[1], sources)):
        return hit[2]
    value = compute()
    if stamp is not None:
        if entries is None:
            entries = _STORE[key] = {}
        entries[tag] = (stamp, tuple(weakref.ref(t) for t in sources), value)
    return value


def remember(key: torch.Tensor, tag: Hashable, value, *sources: torch.Tensor) -> None:
    """Record ``value`` for ``(key, tag)`` (what :func:`remembered` would compute)."""
    remembered(key, tag, lambda: value, *sources)
