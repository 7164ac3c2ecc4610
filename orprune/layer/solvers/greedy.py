"""Greedy forward selection by the loss reduction after compensation (CaP-style ranking).

At each step the channel whose addition lowers the refit error most is added. With ``H = G + rI``
and the kept set ``S``, the reduction from adding block ``c`` is

.. math::

    \\Delta_c = \\operatorname{tr}\\left(R_c^T P_{cc}^{+} R_c\\right),\\quad
    P = H - H_{:S} H_{SS}^{-1} H_{S:},\\quad R = B - H_{:S} H_{SS}^{-1} B_S,

the Schur complement of the kept channels. Adding ``c`` is a rank-``g`` update of ``P`` and
``R``, so a whole path costs ``O(k (Cg)^2 g)``. One path gives the error for every ``k``: the
error curve of the layer. See ``formulations/least_squares_reconstruction.md``.
"""

from __future__ import annotations

import time

import numpy as np

from orprune.layer.problem import LayerProblem
from orprune.layer.solvers.registry import heuristic_selection, register_solver

__all__ = ["greedy_path"]


def _block_pinv(blocks: np.ndarray, threshold: float) -> np.ndarray:
    """Pseudo-inverses of a stack of symmetric PSD blocks, eigenvalues below ``threshold`` cut."""
    values, vectors = np.linalg.eigh(blocks)
    inverse = np.where(values > threshold, 1.0 / np.where(values > threshold, values, 1.0), 0.0)
    return np.einsum("...ij,...j,...kj->...ik", vectors, inverse, vectors)


def greedy_path(prob: LayerProblem, k: int, initial: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Forward selection up to ``k`` channels.

    Parameters
    ----------
    prob : LayerProblem
    k : int
        Number of channels in the final set.
    initial : ndarray of int, optional
        Channels forced in first (in this order).

    Returns
    -------
    order : ndarray of int, shape (k,)
        Channels in the order they were added.
    errors : ndarray, shape (k + 1,)
        ``errors[j]`` is the reconstruction error of ``order[:j]`` (up to rounding drift).
    """
    C, g = prob.n_channels, prob.group_size
    P = prob.gram + prob.ridge * np.eye(prob.n_features)
    R = prob.cross.copy()
    # Schur complements of already-covered directions are numerical noise; cut them relative to
    # the scale of the data, not of each block, or noise would look like a large gain.
    threshold = 1e-10 * max(float(np.max(np.diag(P))), np.finfo(float).tiny)
    chosen = np.zeros(C, dtype=bool)
    order: list[int] = []
    errors = [prob.yy]
    forced = list(initial) if initial is not None else []
    idx = np.arange(C)
    for step in range(k):
        blocks = P.reshape(C, g, C, g)[idx, :, idx, :]
        inverse = _block_pinv(blocks, threshold)
        if step < len(forced):
            best = int(forced[step])
        else:
            residual = R.reshape(C, g, -1)
            gains = np.einsum("cgo,cgh,cho->c", residual, inverse, residual)
            gains[chosen] = -np.inf
            best = int(np.argmax(gains))  # ties: lowest index
        cols = slice(best * g, (best + 1) * g)
        pc = P[:, cols] @ inverse[best]
        gain = float(np.sum(R[cols] * (inverse[best] @ R[cols])))
        R -= pc @ R[cols]
        P -= pc @ P[cols, :]
        chosen[best] = True
        order.append(best)
        errors.append(errors[-1] - gain)
    return np.asarray(order, dtype=int), np.asarray(errors)


@register_solver("greedy", exact=False, description="forward selection by Schur-complement loss reduction")
def solve_greedy(prob: LayerProblem, k: int, *, time_limit: float | None = None):
    """Greedy forward selection; a heuristic (status ``"feasible"``)."""
    start = time.perf_counter()
    order, _ = greedy_path(prob, k)
    mask = np.zeros(prob.n_channels, dtype=bool)
    mask[order] = True
    return heuristic_selection(prob, mask, "greedy", start, info={"order": order.tolist()})
