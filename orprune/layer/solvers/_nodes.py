"""Reduced node problems of the branch-and-bound, and their combinatorial bounds.

A node fixes the channels ``F1`` in and leaves ``U`` free (the others are out). Eliminating
``F1`` by a Schur complement gives a problem of the same form over ``U`` alone:

.. math::

    P = H_{UU} - H_{UF} H_{FF}^{-1} H_{FU},\\quad R = B_U - H_{UF} H_{FF}^{-1} B_F,\\quad
    e_0 = f(F_1),\\qquad f(F_1 \\cup T) = e_0 - \\operatorname{tr}(R_T^T P_{TT}^{-1} R_T).

With ``A = F1 u U``, ``M = P^{-1}`` and ``w = M R`` (the fit on all of ``A``), removing channel
``c`` costs exactly ``delta_c = w_c^T M_cc^{-1} w_c`` and removing the pair ``{c, c'}`` costs
``w_{cc'}^T M_{cc',cc'}^{-1} w_{cc'}``. Because the error never decreases when channels are
removed, a completion that removes the set ``J`` costs at least the largest single or pair
increase inside ``J``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from orprune.layer.solvers._perspective import block_quadratic, blocks_of

__all__ = ["columns", "reduce_problem", "keep_channels", "remove_channels", "pair_increases",
           "removable_core", "remove_channels_inverse", "single_increases"]


def columns(positions: np.ndarray | list[int], g: int) -> np.ndarray:
    """Feature columns of the channels at ``positions``."""
    positions = np.asarray(positions, dtype=int)
    return (positions[:, None] * g + np.arange(g)).ravel()


def reduce_problem(H: np.ndarray, B: np.ndarray, yy: float, g: int, kept: list[int],
                   free: list[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """``(P, R, e0)`` of the node with ``kept`` fixed in and ``free`` undecided."""
    cols_u = columns(free, g)
    if not kept:
        return H[np.ix_(cols_u, cols_u)].copy(), B[cols_u].copy(), float(yy)
    cols_f = columns(kept, g)
    factor = scipy.linalg.cholesky(H[np.ix_(cols_f, cols_f)], lower=True, check_finite=False)
    X = scipy.linalg.solve_triangular(factor, H[np.ix_(cols_f, cols_u)], lower=True, check_finite=False)
    Y = scipy.linalg.solve_triangular(factor, B[cols_f], lower=True, check_finite=False)
    return H[np.ix_(cols_u, cols_u)] - X.T @ X, B[cols_u] - X.T @ Y, float(yy - np.sum(Y * Y))


def keep_channels(P: np.ndarray, R: np.ndarray, e0: float, positions: np.ndarray,
                  g: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Eliminate the channels at ``positions`` (of the free list) into the kept set."""
    n = P.shape[0] // g
    cols = columns(positions, g)
    rest = columns(np.setdiff1d(np.arange(n), positions), g)
    factor = scipy.linalg.cholesky(P[np.ix_(cols, cols)], lower=True, check_finite=False)
    X = scipy.linalg.solve_triangular(factor, P[np.ix_(cols, rest)], lower=True, check_finite=False)
    Y = scipy.linalg.solve_triangular(factor, R[cols], lower=True, check_finite=False)
    return P[np.ix_(rest, rest)] - X.T @ X, R[rest] - X.T @ Y, float(e0 - np.sum(Y * Y))


def remove_channels(P: np.ndarray, R: np.ndarray, positions: np.ndarray,
                    g: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop the channels at ``positions`` (of the free list)."""
    n = P.shape[0] // g
    rest = columns(np.setdiff1d(np.arange(n), positions), g)
    return P[np.ix_(rest, rest)], R[rest]


def pair_increases(M: np.ndarray, w: np.ndarray, g: int) -> np.ndarray:
    """``Pi[c, c']``: exact error increase of removing both ``c`` and ``c'`` from ``A``.

    ``w_J^T M_JJ^{-1} w_J = tr(M_JJ^{-1} (w w^T)_JJ)``: one ``2g x 2g`` inverse per pair against
    the precomputed outer product, whatever the number of outputs.
    """
    n = M.shape[0] // g
    Mb = M.reshape(n, g, n, g).transpose(0, 2, 1, 3)  # (n, n, g, g)
    Ob = (w @ w.T).reshape(n, g, n, g).transpose(0, 2, 1, 3)
    iu, ju = np.triu_indices(n, 1)
    K = np.concatenate([np.concatenate([Mb[iu, iu], Mb[iu, ju]], axis=2),
                        np.concatenate([Mb[ju, iu], Mb[ju, ju]], axis=2)], axis=1)
    O = np.concatenate([np.concatenate([Ob[iu, iu], Ob[iu, ju]], axis=2),
                        np.concatenate([Ob[ju, iu], Ob[ju, ju]], axis=2)], axis=1)
    values = np.einsum("pij,pji->p", np.linalg.inv(K), O)
    Pi = np.full((n, n), np.inf)
    Pi[iu, ju] = values
    Pi[ju, iu] = values
    return Pi


def removable_core(compatible: np.ndarray, alive: np.ndarray, d: int) -> tuple[np.ndarray, bool]:
    """Channels that can still belong to a removal set of size ``d``, and whether one can exist.

    ``compatible[c, c']`` says the pair may be removed together. A removal set is a ``d``-clique
    of that graph, so its members have degree ``>= d - 1`` inside it: peel the others (the
    ``(d-1)``-core), then bound the clique number by a greedy colouring.
    """
    alive = alive.copy()
    while True:
        if alive.sum() < d:
            return alive, False
        degree = compatible[np.ix_(alive, alive)].sum(axis=1)
        low = degree < d - 1
        if not low.any():
            break
        alive[np.flatnonzero(alive)[low]] = False
    sub = compatible[np.ix_(alive, alive)]
    colours = np.full(sub.shape[0], -1)
    for v in np.argsort(-sub.sum(axis=1), kind="stable"):
        used = set(colours[sub[v] & (colours >= 0)].tolist())
        colour = 0
        while colour in used:
            colour += 1
        colours[v] = colour
    return alive, int(colours.max()) + 1 >= d


def remove_channels_inverse(M: np.ndarray, w: np.ndarray, position: int,
                            g: int) -> tuple[np.ndarray, np.ndarray]:
    """``(H_{A'A'}^{-1}, H_{A'A'}^{-1} B_{A'})`` for ``A' = A`` minus one channel, from ``M, w`` of ``A``."""
    n = M.shape[0] // g
    cols = columns([position], g)
    rest = columns(np.setdiff1d(np.arange(n), [position]), g)
    X = np.linalg.solve(M[np.ix_(cols, cols)], M[np.ix_(cols, rest)])
    return M[np.ix_(rest, rest)] - M[np.ix_(rest, cols)] @ X, w[rest] - X.T @ w[cols]


def single_increases(M: np.ndarray, w: np.ndarray, g: int) -> np.ndarray:
    """``delta_c = w_c^T M_cc^{-1} w_c``: exact increase of removing channel ``c`` from ``A``."""
    return block_quadratic(np.linalg.inv(blocks_of(M, g)), w)
