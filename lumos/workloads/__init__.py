"""Built-in SciML workloads, generated offline and deterministically from a seed.

``lumos.workloads.load("cfd_flux", seed=0)`` returns a :class:`Workload`; ``available()``
lists the names.
"""
from __future__ import annotations

from . import cfd_flux
from .base import Workload

WORKLOADS = {"cfd_flux": cfd_flux.load}


def available() -> list[str]:
    """Names of the built-in workloads, sorted."""
    return sorted(WORKLOADS)


def load(name: str, **kwargs) -> Workload:
    """Build workload ``name``; ``kwargs`` go to its ``load`` (e.g. ``seed=``, ``n_train=``)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known workloads: {', '.join(available())}")
    return WORKLOADS[name](**kwargs)


__all__ = ["WORKLOADS", "Workload", "available", "load"]
