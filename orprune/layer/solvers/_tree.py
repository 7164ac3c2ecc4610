"""Node state and cheap bounds of the combinatorial branch and bound (``solver="bnb"``).

A node keeps the channels ``K``, leaves ``U`` free and has dropped the rest; ``A = K u U`` and
``m = k - |K|`` channels of ``U`` must still be kept, ``d = |U| - m`` removed. The node carries two
exact views of the same problem, each updated by one rank-``g`` block per branching step:

* the *kept view* ``(P, R, e0)``: the Schur complement of ``H_KK`` in ``H_AA`` restricted to ``U``,
  ``R = B_U - H_UK H_KK^{-1} B_K`` and ``e0 = f(K)`` (keeping a channel eliminates its block:
  ``keep``; dropping one deletes its rows);
* the *superset view* ``(M, w, fA)``: ``M = (H_AA^{-1})_UU = P^{-1}``, ``w = M R`` and
  ``fA = f(A)`` (dropping a channel is a rank-``g`` downdate of the inverse: ``drop``; keeping one
  deletes its rows, since ``A`` does not change).

Neither is ever refactorised inside a dive. See ``formulations/branch_and_bound.md`` for the bounds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["NodeState", "build_state", "keep", "drop", "node_bounds", "Bounds", "safe"]


def safe(value):
    """Bounds lose a little to rounding: give it back before comparing with the cutoff."""
    return value - 1e-12 - 1e-9 * np.abs(value)


def _columns(positions, g: int) -> np.ndarray:
    positions = np.asarray(positions, dtype=int)
    return (positions[:, None] * g + np.arange(g)).ravel()


@dataclass
class NodeState:
    """Matrices of a node (normalised so that ``||Y||^2 = 1``); ``free`` holds channel ids."""

    kept: tuple
    free: np.ndarray
    P: np.ndarray
    R: np.ndarray
    e0: float
    M: np.ndarray
    w: np.ndarray
    fA: float


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return 0.5 * (matrix + matrix.T)


def build_state(H: np.ndarray, B: np.ndarray, g: int, kept, free) -> NodeState:
    """Factor a node from scratch (only when a queued node is resumed); ``LinAlgError`` if singular."""
    kept = tuple(int(c) for c in kept)
    free = np.asarray(free, dtype=int)
    cols_u = _columns(free, g)
    P = H[np.ix_(cols_u, cols_u)]
    R = B[cols_u]
    e0 = 1.0
    if kept:
        cols_k = _columns(list(kept), g)
        factor = scipy.linalg.cholesky(H[np.ix_(cols_k, cols_k)], lower=True, check_finite=False)
        X = scipy.linalg.solve_triangular(factor, H[np.ix_(cols_k, cols_u)], lower=True, check_finite=False)
        Y = scipy.linalg.solve_triangular(factor, B[cols_k], lower=True, check_finite=False)
        P, R, e0 = P - X.T @ X, R - X.T @ Y, e0 - float(np.sum(Y * Y))
    P = _symmetric(P)
    factor = scipy.linalg.cholesky(P, lower=True, check_finite=False)
    M = scipy.linalg.cho_solve((factor, True), np.eye(P.shape[0]), check_finite=False)
    w = M @ R
    return NodeState(kept, free, P, np.ascontiguousarray(R), e0, _symmetric(M), w, e0 - float(np.sum(R * w)))


def keep(state: NodeState, positions: np.ndarray, g: int) -> NodeState:
    """Move the free channels at ``positions`` into ``K``: a rank-``|positions| g`` Schur update of ``P``."""
    n = state.free.size
    rest_pos = np.setdiff1d(np.arange(n), positions)
    cols, rest = _columns(positions, g), _columns(rest_pos, g)
    factor = scipy.linalg.cholesky(state.P[np.ix_(cols, cols)], lower=True, check_finite=False)
    X = scipy.linalg.solve_triangular(factor, state.P[np.ix_(cols, rest)], lower=True, check_finite=False)
    Y = scipy.linalg.solve_triangular(factor, state.R[cols], lower=True, check_finite=False)
    P = _symmetric(state.P[np.ix_(rest, rest)] - X.T @ X)
    return NodeState(state.kept + tuple(int(c) for c in state.free[positions]), state.free[rest_pos],
                     P, state.R[rest] - X.T @ Y, state.e0 - float(np.sum(Y * Y)),
                     state.M[np.ix_(rest, rest)], state.w[rest], state.fA)


def drop(state: NodeState, positions: np.ndarray, g: int) -> NodeState:
    """Remove the free channels at ``positions`` from ``A``: a rank-``|positions| g`` downdate of ``M``."""
    n = state.free.size
    rest_pos = np.setdiff1d(np.arange(n), positions)
    cols, rest = _columns(positions, g), _columns(rest_pos, g)
    factor = scipy.linalg.cho_factor(state.M[np.ix_(cols, cols)], lower=True, check_finite=False)
    X = scipy.linalg.cho_solve(factor, np.hstack([state.M[np.ix_(cols, rest)], state.w[cols]]), check_finite=False)
    X_rest, X_w = X[:, :rest.size], X[:, rest.size:]
    M = _symmetric(state.M[np.ix_(rest, rest)] - state.M[np.ix_(rest, cols)] @ X_rest)
    increase = float(np.sum(state.w[cols] * X_w))
    return NodeState(state.kept, state.free[rest_pos], state.P[np.ix_(rest, rest)], state.R[rest], state.e0,
                     M, state.w[rest] - X_rest.T @ state.w[cols], state.fA + max(increase, 0.0))


def _blocks(matrix: np.ndarray, g: int) -> np.ndarray:
    n = matrix.shape[0] // g
    return matrix.reshape(n, g, n, g)[np.arange(n), :, np.arange(n), :]


def _quadratic(blocks: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``tr(V_c^T A_c V_c)`` for each block."""
    Vb = V.reshape(blocks.shape[0], blocks.shape[1], -1)
    return np.einsum("cao,cab,cbo->c", Vb, blocks, Vb)


def _smallest_sums(values: np.ndarray, d: int) -> tuple[float, np.ndarray]:
    """Sum of the ``d`` smallest values, and that sum when each entry is excluded."""
    n = values.size
    order = np.argsort(values, kind="stable")
    total = float(values[order[:d]].sum())
    excluded = np.full(n, total)
    if d < n:
        excluded[order[:d]] = total - values[order[:d]] + values[order[d]]
    else:
        excluded[:] = np.inf
    return total, excluded


def _largest_sums(values: np.ndarray, m: int) -> tuple[float, np.ndarray]:
    """Sum of the ``m`` largest values, and that sum when each entry is excluded."""
    total, excluded = _smallest_sums(-values, m)
    return -total, -excluded


def _removal_bound(delta: np.ndarray, e: np.ndarray, d: int) -> float:
    """``min_{|J| = d} max(max_{c in J} delta_c, sum_{c in J} e_c)``.

    For the removal set ``J`` whose largest ``delta`` is the ``t``-th smallest, ``J`` lies among the
    ``t`` cheapest channels by ``delta`` and its ``e``-sum is at least the ``d`` smallest ``e`` there.
    """
    order = np.argsort(delta, kind="stable")
    ds, es = delta[order], e[order]
    best = np.inf
    heap: list = []  # max-heap (negated) of the d smallest e seen so far
    running = 0.0
    for t in range(ds.size):
        value = float(es[t])
        if len(heap) < d:
            heapq.heappush(heap, -value)
            running += value
        elif value < -heap[0]:
            running += value + heapq.heapreplace(heap, -value)
        if len(heap) == d:
            best = min(best, max(float(ds[t]), running))
            if ds[t] >= best:
                break
    return best


@dataclass
class Bounds:
    """Cheap bounds of a node and the per-channel bounds of its two children."""

    bound: float  # node lower bound (safe)
    delta: np.ndarray  # exact single removal increases from A
    remove_child: np.ndarray  # lower bound when channel c is dropped
    keep_child: np.ndarray  # lower bound when channel c is kept
    kind: str  # which bound decided ``bound``


def node_bounds(state: NodeState, D: np.ndarray, D_inv: np.ndarray, m: int, g: int) -> Bounds:
    """Superset, single-removal, separable removal and separable keep bounds (all safe).

    ``D`` (``D_inv``) are the blocks (inverses) of a split valid at the node (the node's or an
    ancestor's precision split restricted to ``U``): ``0 < D_U <= P``, hence ``M <= blkdiag(D_c^{-1})``.
    """
    n = state.free.size
    d = n - m
    delta = np.maximum(_quadratic(np.linalg.inv(_blocks(state.M, g)), state.w), 0.0)
    e = np.maximum(_quadratic(D, state.w), 0.0)  # w_c^T D_c w_c <= removal share of c
    gamma = np.maximum(_quadratic(D_inv, state.R), 0.0)  # R_c^T D_c^{-1} R_c >= gain share of c
    fA, e0 = state.fA, state.e0
    removal = _removal_bound(delta, e, d)
    top_m, top_excl = _largest_sums(gamma, m)
    bounds = {"superset": fA, "removal": fA + removal, "keep": e0 - top_m}
    kind = max(bounds, key=bounds.get)
    # children: c dropped -> (d-1) more from U - c; c kept -> m-1 more kept from U - c, d from U - c
    e_sum_d1, e_excl_d1 = _smallest_sums(e, d - 1)
    remove_child = fA + np.maximum(delta, e + e_excl_d1)
    remove_child = np.maximum(remove_child, e0 - _largest_sums(gamma, m)[1])
    if m >= 1:
        keep_child = e0 - gamma - _largest_sums(gamma, m - 1)[1]
    else:
        keep_child = np.full(n, np.inf)
    # kept c: the d removals come from U - c
    _, delta_excl = _dth_smallest_excluded(delta, d)
    _, e_excl_d = _smallest_sums(e, d)
    keep_child = np.maximum(keep_child, fA + np.maximum(delta_excl, e_excl_d))
    node = safe(bounds[kind])
    return Bounds(node, delta, np.maximum(safe(remove_child), node), np.maximum(safe(keep_child), node), kind)


def _dth_smallest_excluded(values: np.ndarray, d: int) -> tuple[float, np.ndarray]:
    """The ``d``-th smallest value, and the ``d``-th smallest of the others for each entry."""
    n = values.size
    order = np.argsort(values, kind="stable")
    dth = float(values[order[d - 1]]) if d >= 1 else -np.inf
    excluded = np.full(n, dth)
    if d >= 1:
        excluded[order[:d]] = values[order[d]] if d < n else np.inf
    return dth, excluded
