"""Validation of :class:`orprune.Pruner`'s options, before any work (a typo fails in microseconds, not after
calibration)."""

from __future__ import annotations

import math
from typing import Any

from orprune.layer.selection import resolve_solver

__all__ = ["check_pruner_options"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_pruner_options(p: Any) -> None:
    """Raise ``ValueError`` naming the first invalid option of the Pruner ``p``."""
    if not isinstance(p.solver, str):
        raise ValueError(f"`solver` must be a solver name, got {p.solver!r}.")
    if p.solver != "auto":
        resolve_solver(p.solver, 1)  # unknown / unavailable solver
    if p.time_limit is not None and not (isinstance(p.time_limit, (int, float)) and not isinstance(p.time_limit, bool)
                                         and p.time_limit > 0):  # inf: no limit
        raise ValueError(f"`time_limit` must be a positive number of seconds or None, got {p.time_limit!r}.")
    if p.polish_time is not None and not (_is_number(p.polish_time) and p.polish_time >= 0):
        raise ValueError(f"`polish_time` must be a number of seconds >= 0 or None, got {p.polish_time!r}.")
    if p.refit_memory is not None and not (_is_number(p.refit_memory) and p.refit_memory >= 0):
        raise ValueError(f"`refit_memory` must be a number of bytes >= 0 or None, got {p.refit_memory!r}.")
    if p.positions_per_image is not None and not (_is_int(p.positions_per_image) and p.positions_per_image >= 1):
        raise ValueError(f"`positions_per_image` must be a positive integer or None, got {p.positions_per_image!r}.")
    if not (_is_number(p.ridge) and p.ridge >= 0):
        raise ValueError(f"`ridge` must be a finite number >= 0, got {p.ridge!r}.")
    for name in ("max_options", "min_channels", "round_to", "probe_images"):
        value = getattr(p, name)
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if p.errors not in ("layer", "output"):
        raise ValueError(f"`errors` must be 'layer' or 'output', got {p.errors!r}.")
    for name in ("residual", "sequential", "cache_targets", "residual_targets", "float32_statistics"):
        if not isinstance(getattr(p, name), bool):
            raise ValueError(f"`{name}` must be True or False, got {getattr(p, name)!r}.")
    if p.executor is not None and not hasattr(p.executor, "map"):
        raise ValueError("`executor` must be a concurrent.futures.Executor (with a `map` method).")
    if p.n_jobs is not None and not (_is_int(p.n_jobs) and p.n_jobs >= 1):
        raise ValueError(f"`n_jobs` must be a positive integer or None, got {p.n_jobs!r}.")
