"""``select``: the one entry point that solves a layer's channel-selection problem."""

from __future__ import annotations

from typing import Any

import numpy as np

from orprune._validation import check_integer
from orprune.layer.problem import LayerProblem
from orprune.layer.result import Selection
from orprune.layer.solvers import SOLVERS, get_solver
from orprune.layer.solvers.registry import trivial_selection

__all__ = ["select", "resolve_solver", "AUTO_EXACT_MAX_CHANNELS", "AUTO_PATH_MIN_FEATURES"]

#: ``solver="auto"`` certifies layers up to this many channels and uses greedy beyond: real 3x3
#: layers of 16 channels certify in under a second, strongly correlated ones of 24 can take hours.
AUTO_EXACT_MAX_CHANNELS = 16

#: ``solver="auto"`` uses the blocked forward/backward ``"path"`` instead of ``"greedy"`` from this
#: many feature columns (``C g``) on: greedy's rank-``g`` steps cost ``C (Cg)^2 g`` memory-bound flops,
#: 19 s at ``C = 512, g = 9``; below it (every unit of ResNet-20) greedy is kept as it was.
AUTO_PATH_MIN_FEATURES = 2048


def resolve_solver(solver: str, n_channels: int, n_features: int | None = None) -> str:
    """The registry name ``solver`` stands for (``"auto"`` depends on the layer size: ``"exact"`` up to
    ``AUTO_EXACT_MAX_CHANNELS`` channels, ``"path"`` from ``AUTO_PATH_MIN_FEATURES`` feature columns,
    ``"greedy"`` between)."""
    if solver == "auto":
        if n_channels <= AUTO_EXACT_MAX_CHANNELS and "exact" in SOLVERS:
            return "exact"
        return "path" if n_features is not None and n_features >= AUTO_PATH_MIN_FEATURES else "greedy"
    get_solver(solver)  # raises for unknown or unavailable solvers
    return solver


def select(
    prob: LayerProblem,
    k: int,
    *,
    solver: str = "auto",
    time_limit: float | None = None,
    **options: Any,
) -> Selection:
    """Choose ``k`` channels of a layer to minimise its reconstruction error.

    .. math::

        \\min_{S \\subseteq \\{1..C\\},\\ |S| = k}\\ \\min_W \\|Y - X_S W\\|_F^2 + r \\|W\\|_F^2

    Parameters
    ----------
    prob : LayerProblem
    k : int
        Channels to keep, ``0 <= k <= C``.
    solver : str, default "auto"
        A registered solver (see :func:`orprune.available_solvers`): ``"exact"``,
        ``"perspective"``, ``"lasso"``, ``"greedy"``, ``"path"``, ``"magnitude"``; ``"auto"`` is
        ``"exact"`` for layers of at most ``AUTO_EXACT_MAX_CHANNELS`` channels, ``"path"`` for
        layers of at least ``AUTO_PATH_MIN_FEATURES`` feature columns and ``"greedy"`` between.
    time_limit : float, optional
        Seconds; exact solvers then return their incumbent with status ``"time_limit"``.
    **options
        Passed to the solver.

    Returns
    -------
    Selection
    """
    if not isinstance(prob, LayerProblem):
        raise ValueError(f"`prob` must be a LayerProblem, got {type(prob).__name__}.")
    k = check_integer(k, "k", 0, prob.n_channels)
    if time_limit is not None and not (np.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"`time_limit` must be a positive number of seconds or None, got {time_limit}.")
    name = resolve_solver(solver, prob.n_channels, prob.n_features)
    if k in (0, prob.n_channels):
        return trivial_selection(prob, k, name)
    result = get_solver(name).func(prob, k, time_limit=time_limit, **options)
    if result.k != k:  # a solver bug must never pass silently
        raise RuntimeError(f"solver {name!r} returned {result.k} channels instead of {k}.")
    return result
