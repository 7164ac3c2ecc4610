"""Swap polishing of one mask on wide layers: 1-swap local search with ``g x g`` algebra only.

:func:`~orprune.layer.solvers.local_search.swap_local_search` forms, for every swap ``S - i + j``, the
updated residual correlation ``r_j(S - i)`` (``g x n_out`` each), which is ``k (C - k) g n_out`` numbers:
gigabytes on a 512-channel 3x3 layer. Here the gain of adding ``j`` to ``T = S - i`` is written through
``g x g`` products only (``formulations/swap_polish.md``):

.. math::

    f(T + j) = f(S) + w_i^T Q_{ii}^{-1} w_i
               - \\operatorname{tr}\\big(P_{new}^{+} (R_{jj} + V_{ji} A^T + A V_{ji}^T + A W_{ii} A^T)\\big),

with ``Q = H_SS^{-1}``, ``w = Q B_S``, ``Z = H_OS Q``, ``A = Z_ji Q_ii^{-1}``,
``P_new = P_jj(S) + A Z_ji^T``, ``R_jj = r_j r_j^T``, ``W_ii = w_i w_i^T`` and ``V_ji = r_j w_i^T``
(one ``(|O| g) x (k g)`` gemm). A unit made by :meth:`LayerProblem.combine` is handled consumer by
consumer: its error is the scaled sum of the consumers' errors, and so is the error of every swap.
Moves are accepted only when the exactly recomputed error (:meth:`LayerProblem.objective`) falls, so
the result is never worse than the start.
"""

from __future__ import annotations

import time

import numpy as np

from orprune.layer.problem import LayerProblem
from orprune.layer.solvers.paths import compress_outputs

__all__ = ["polish_swap"]


def _pinv_stack(blocks: np.ndarray, threshold: float) -> np.ndarray:
    """Pseudo-inverses of stacked symmetric PSD ``g x g`` blocks (eigenvalues below ``threshold`` cut)."""
    if blocks.shape[-1] == 1:
        inverse = np.where(blocks > threshold, 1.0 / np.where(blocks > threshold, blocks, 1.0), 0.0)
        return inverse
    values, vectors = np.linalg.eigh(blocks)
    inverse = np.where(values > threshold, 1.0 / np.where(values > threshold, values, 1.0), 0.0)
    return np.einsum("...ij,...j,...kj->...ik", vectors, inverse, vectors)


def _inverse(h: np.ndarray, threshold: float) -> np.ndarray:
    from orprune.layer.solvers._perspective import spd_inverse

    try:
        return spd_inverse(h)
    except np.linalg.LinAlgError:  # singular without ridge: the pseudo-inverse (minimum-norm refit)
        values, vectors = np.linalg.eigh(h)
        inv = np.where(values > threshold, 1.0 / np.maximum(values, threshold), 0.0)
        return (vectors * inv) @ vectors.T


class _PartSwaps:
    """The swap neighbourhood of one consumer: ``H = scale (G + r I)``, ``B = scale F`` (``F F^T = B B^T``)."""

    def __init__(self, prob: LayerProblem, scale: float) -> None:
        self.prob, self.scale, self.g = prob, scale, prob.group_size
        self.cross = compress_outputs(prob.cross)  # errors depend on B only through B B^T
        self.yy = prob.yy
        self.threshold = 1e-11 * max(float(np.max(np.diag(prob.gram))) + prob.ridge, np.finfo(float).tiny)

    def _cols(self, channels: np.ndarray) -> np.ndarray:
        return (channels[:, None] * self.g + np.arange(self.g)).ravel()

    def errors(self, kept: np.ndarray, dropped: np.ndarray) -> tuple[np.ndarray, float]:
        """Predicted errors of ``S - kept[a] + dropped[b]`` (shape ``(k, C - k)``) and of ``S``, times ``scale``."""
        g, gram, ridge = self.g, self.prob.gram, self.prob.ridge
        cs, co = self._cols(kept), self._cols(dropped)
        n_k, n_o = kept.size, dropped.size
        h_ss = gram[np.ix_(cs, cs)]
        h_ss[np.diag_indices_from(h_ss)] += ridge
        Q = _inverse(h_ss, self.threshold)
        del h_ss
        b_s = self.cross[cs]
        w = Q @ b_s
        current = self.yy - float(np.sum(b_s * w))
        h_os = gram[np.ix_(co, cs)]
        Z = h_os @ Q  # (n_o g, n_k g)
        P = gram[np.ix_(co, co)].reshape(n_o, g, n_o, g)[np.arange(n_o), :, np.arange(n_o), :].copy()
        P[:, np.arange(g), np.arange(g)] += ridge
        Zb = Z.reshape(n_o, g, n_k, g)
        P -= np.einsum("jaib,jcib->jac", Zb, h_os.reshape(n_o, g, n_k, g))  # P_jj(S) = H_jj - Z_jS H_Sj
        del h_os
        r = self.cross[co] - Z @ b_s  # (n_o g, m)
        Q_ii = Q.reshape(n_k, g, n_k, g)[np.arange(n_k), :, np.arange(n_k), :]
        Q_inv = _pinv_stack(Q_ii, 1e-12 * max(float(np.max(np.abs(Q_ii))), np.finfo(float).tiny))
        wb = w.reshape(n_k, g, -1)
        W = np.einsum("iao,ibo->iab", wb, wb)  # w_i w_i^T
        removal = np.einsum("iab,iab->i", W, Q_inv)  # tr(Q_ii^-1 w_i w_i^T)
        rb = r.reshape(n_o, g, -1)
        R = np.einsum("jao,jbo->jab", rb, rb)  # r_j r_j^T
        V = (r @ w.T).reshape(n_o, g, n_k, g)  # V[j, :, i, :] = r_j w_i^T
        A = np.einsum("jaib,ibc->ijac", Zb, Q_inv)  # Z_ji Q_ii^{-1}
        P_new = P[None] + np.einsum("ijac,jdic->ijad", A, Zb)  # P_jj + A Z_ji^T
        AV = np.einsum("ijac,jbic->ijab", A, V)  # A V_ji^T
        M = R[None] + AV + AV.transpose(0, 1, 3, 2) + np.einsum("ijac,icd,ijbd->ijab", A, W, A)
        gain = np.einsum("ijab,ijba->ij", _pinv_stack(P_new, self.threshold), M)
        return self.scale * (current + removal[:, None] - gain), self.scale * current


def _parts(prob: LayerProblem) -> list[tuple[LayerProblem, float]]:
    components = getattr(prob, "components", None)
    return list(components) if components else [(prob, 1.0)]


def polish_swap(
    prob: LayerProblem,
    mask: np.ndarray,
    *,
    deadline: float | None = None,
    max_moves: int | None = None,
    rel_tol: float = 1e-9,
    candidates: int = 3,
) -> tuple[np.ndarray, float, int]:
    """Best-improvement 1-swap local search from ``mask`` for wide layers and combined units.

    Each round predicts the error of every swap (one kept channel out, one dropped in) with the
    ``g x g`` formulas of the module docstring, consumer by consumer, tries the ``candidates`` best
    predictions exactly and takes the first whose exact error is lower by more than
    ``rel_tol * ||Y||^2``. Stops at a 1-swap local optimum (up to the tolerance), after ``max_moves``
    moves, or at ``deadline`` (a ``time.perf_counter`` value; checked before each round).

    Parameters
    ----------
    prob : LayerProblem
        Any problem; one made by :meth:`LayerProblem.combine` is never densified.
    mask : ndarray of bool, shape (C,)
    deadline : float, optional
    max_moves : int, optional
    rel_tol : float, default 1e-9
    candidates : int, default 3
        Predicted-best swaps checked exactly per round.

    Returns
    -------
    mask : ndarray of bool
        Never worse than the start.
    objective : float
        ``prob.objective(mask)``.
    moves : int
        Accepted swaps.
    """
    mask = np.asarray(mask, dtype=bool).copy()
    if mask.shape != (prob.n_channels,):
        raise ValueError(f"`mask` must have shape ({prob.n_channels},), got {mask.shape}.")
    best = prob.objective(mask)
    k = int(mask.sum())
    if k in (0, prob.n_channels):
        return mask, best, 0
    parts = [_PartSwaps(p, s) for p, s in _parts(prob)]
    tol = rel_tol * max(prob.yy, np.finfo(float).tiny)
    moves = 0
    while max_moves is None or moves < max_moves:
        if deadline is not None and time.perf_counter() > deadline:
            break
        kept, dropped = np.flatnonzero(mask), np.flatnonzero(~mask)
        errors = sum(part.errors(kept, dropped)[0] for part in parts)
        improved = False
        for flat in np.argsort(errors, axis=None)[:candidates]:
            i, j = np.unravel_index(flat, errors.shape)
            if errors[i, j] >= best - tol:  # predictions are sorted: nothing better is predicted
                break
            trial = mask.copy()
            trial[kept[i]], trial[dropped[j]] = False, True
            value = prob.objective(trial)
            if value < best - tol:
                mask, best, improved = trial, value, True
                moves += 1
                break
        if not improved:
            break
    return mask, best, moves
