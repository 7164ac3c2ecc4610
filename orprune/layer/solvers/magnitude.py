"""Magnitude baseline: keep the channels whose weights have the largest norm."""

from __future__ import annotations

import time

import numpy as np

from orprune.layer.problem import LayerProblem
from orprune.layer.solvers.registry import heuristic_selection, register_solver


def channel_norms(prob: LayerProblem, norm: str = "l2") -> np.ndarray:
    """Norm of each channel's slice of the layer weights.

    Uses ``prob.weights`` (the layer's original weights) when given, otherwise the least-squares
    weights with every channel kept, which equal the original weights when ``Y = X W``.
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"`norm` must be 'l1' or 'l2', got {norm!r}.")
    weights = prob.weights if prob.weights is not None else prob.full_weights
    blocks = np.abs(weights.reshape(prob.n_channels, -1))
    return blocks.sum(axis=1) if norm == "l1" else np.sqrt((blocks**2).sum(axis=1))


@register_solver("magnitude", exact=False, description="largest filter norms (L1 or L2)")
def solve_magnitude(prob: LayerProblem, k: int, *, time_limit: float | None = None, norm: str = "l2"):
    """Keep the ``k`` channels of largest weight norm, then refit them by least squares."""
    start = time.perf_counter()
    norms = channel_norms(prob, norm)
    keep = np.argsort(-norms, kind="stable")[:k]
    mask = np.zeros(prob.n_channels, dtype=bool)
    mask[keep] = True
    return heuristic_selection(prob, mask, "magnitude", start)
