r"""The best rank-``r`` map of one layer, in closed form, and its whole error curve from one SVD.

The layer problem of :class:`~orprune.layer.problem.LayerProblem` with a rank constraint in place of the
channel constraint:

.. math::

    \min_{W:\ \operatorname{rank} W \le r}\ \|Y - XW\|_F^2 + \rho \|W\|_F^2
    = f_{\mathrm{full}} + \sum_{i > r} \sigma_i^2,

where :math:`\sigma_i` are the singular values of :math:`M = H^{-1/2} B` with :math:`H = G + \rho I`. It is
exact with the ridge: the objective is :math:`f_{\mathrm{full}} + \|H^{1/2} W - H^{-1/2} B\|_F^2` and
:math:`W \mapsto H^{1/2} W` preserves rank, so Eckart-Young applies to :math:`H^{1/2} W`. The derivation
(and the case of a singular :math:`G` without ridge) is in ``formulations/low_rank.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from orprune._status import OPTIMAL
from orprune._validation import as_finite_array, check_integer
from orprune.layer.problem import LayerProblem
from orprune.layer.result import SolverResult

__all__ = ["RankCurve", "RankSelection", "map_objective", "rank_curve", "select_rank"]

#: Eigenvalues of ``G + ridge I`` below this fraction of the largest are treated as zero (the range of
#: ``G`` is then what the map can use); the same cut-off as the pseudo-inverse of ``LayerProblem.refit``.
EIGEN_RTOL = 1e-12


@dataclass(frozen=True)
class RankSelection(SolverResult):
    """The best rank-``r`` map of a layer as two factors, and its certificate.

    Attributes
    ----------
    rank : int
        ``r``: columns of ``left`` = rows of ``right``.
    left : ndarray, shape (C*g, r)
        First factor, the thin layer that reads the input (a ``kh x kw`` conv to ``r`` channels for a
        conv, a Linear to ``r`` features). Its outputs are whitened:
        ``left.T @ (G + ridge I) @ left = I`` (on the range of ``G``).
    right : ndarray, shape (r, n_out)
        Second factor (a 1x1 conv / Linear from the ``r`` intermediate channels), ``diag(s_r) V_r^T``.
    objective : float
        ``prob``'s objective of ``weights``: ``||Y - X W||^2 + ridge ||W||^2`` (:func:`map_objective`).
    bound : float
        Proven lower bound on every rank-``r`` map's objective, ``f_full + sum_{i>r} s_i^2``; equal to
        ``objective`` up to rounding (the closed form is optimal).
    gap : float
        ``(objective - bound) / objective`` (0 up to rounding).
    status : str
        ``"optimal"``.
    singular_values : ndarray
        All singular values ``s`` of the whitened cross term ``(G + ridge I)^(-1/2) B``, decreasing.
    solve_time : float
    message : str
    """

    rank: int
    left: np.ndarray
    right: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    singular_values: np.ndarray
    solve_time: float
    message: str = ""

    @property
    def weights(self) -> np.ndarray:
        """The rank-``r`` map ``left @ right``, shape (C*g, n_out), layout of ``LayerProblem``."""
        return self.left @ self.right


@dataclass(frozen=True)
class RankCurve:
    """Optimal error of a layer for every rank ``0..max_rank``: certified, from one SVD.

    Attributes
    ----------
    ranks : ndarray of int
        ``0, 1, ..., min(C*g, n_out)``.
    errors : ndarray
        ``errors[r] = f_full + sum_{i>r} s_i^2``, the optimal objective over maps of rank <= ``r``;
        non-increasing, ``errors[0] = ||Y||^2``.
    singular_values : ndarray
        ``s``, padded with zeros to ``max_rank`` entries.
    full_objective : float
        ``f_full = ||Y||^2 - sum_i s_i^2``, the unconstrained least-squares error.
    scale : float
        ``||Y||^2``: ``errors / scale`` are the relative errors that compare layers.
    solve_time : float
    """

    ranks: np.ndarray
    errors: np.ndarray
    singular_values: np.ndarray
    full_objective: float
    scale: float
    solve_time: float

    def __post_init__(self) -> None:
        for array in (self.ranks, self.errors, self.singular_values):
            array.flags.writeable = False

    @property
    def relative_errors(self) -> np.ndarray:
        return self.errors / max(self.scale, np.finfo(float).tiny)

    @property
    def max_rank(self) -> int:
        return int(self.ranks[-1])

    def energy_rank(self, energy: float) -> int:
        """Smallest rank keeping at least ``energy`` of ``sum_i s_i^2`` (TRP's energy threshold,
        here of the whitened cross term, i.e. of the explained part of ``||Y||^2``)."""
        if not 0.0 <= energy <= 1.0:
            raise ValueError(f"`energy` must lie in [0, 1], got {energy}.")
        power = self.singular_values**2
        total = power.sum()
        if total <= 0.0:
            return 0
        kept = np.concatenate([[0.0], np.cumsum(power)]) / total
        return int(np.flatnonzero(kept >= energy - 1e-12)[0])


def map_objective(prob: LayerProblem, weights: Any) -> float:
    """``prob``'s objective of any map: ``||Y - X W||_F^2 + ridge ||W||_F^2`` from the statistics,

    .. math:: \\|Y\\|^2 - 2 \\operatorname{tr}(W^T B) + \\operatorname{tr}(W^T (G + \\rho I) W).

    ``LayerProblem.objective(mask)`` is this at the refit weights of ``mask``.
    """
    if not isinstance(prob, LayerProblem):
        raise ValueError(f"`prob` must be a LayerProblem, got {type(prob).__name__}.")
    w = as_finite_array(weights, "weights", ndim=(1, 2))
    w = w[:, None] if w.ndim == 1 else w
    if w.shape != prob.cross.shape:
        raise ValueError(f"`weights` must have shape (C*g, n_out) = {prob.cross.shape}, got {w.shape}.")
    hw = prob.gram @ w + prob.ridge * w
    return float(prob.yy - 2.0 * np.sum(w * prob.cross) + np.sum(w * hw))


def _whitened_svd(prob: LayerProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(T, U, s, Vt)``: the whitening ``T = Q_k diag(lam_k^(-1/2))`` from ``H = Q diag(lam) Q^T`` (so
    ``T T^T = H^+``, ``T^T H T = I``) and the thin SVD ``T^T B = U diag(s) Vt``. Cached on the problem
    (its arrays are read-only)."""
    cached = prob.__dict__.get("_low_rank_svd")
    if cached is not None:
        return cached
    lam, q = np.linalg.eigh(prob.gram + prob.ridge * np.eye(prob.n_features))
    keep = lam > EIGEN_RTOL * max(float(lam[-1]), np.finfo(float).tiny)
    # B = X^T Y lies in range(G): the dropped directions (null space, without ridge) carry nothing
    t = q[:, keep] / np.sqrt(lam[keep])
    u, s, vt = np.linalg.svd(t.T @ prob.cross, full_matrices=False)
    result = (t, u, s, vt)
    prob.__dict__["_low_rank_svd"] = result
    return result


def _max_rank(prob: LayerProblem) -> int:
    return min(prob.n_features, prob.n_outputs)


def _check_problem(prob: Any) -> LayerProblem:
    if not isinstance(prob, LayerProblem):
        raise ValueError(f"`prob` must be a LayerProblem, got {type(prob).__name__}.")
    return prob


def rank_curve(prob: LayerProblem) -> RankCurve:
    """The optimal error of ``prob`` at every rank, from one eigendecomposition and one SVD.

    .. math:: e(r) = \\min_{\\operatorname{rank} W \\le r} \\|Y - XW\\|_F^2 + \\rho\\|W\\|_F^2
              = \\|Y\\|^2 - \\sum_{i \\le r} \\sigma_i^2

    Every value is certified (Eckart-Young on the whitened problem, ``formulations/low_rank.md``);
    ``select_rank(prob, r).objective == errors[r]`` up to rounding.
    """
    start = time.perf_counter()
    prob = _check_problem(prob)
    _, _, s, _ = _whitened_svd(prob)
    n = _max_rank(prob)
    sv = np.zeros(n)
    sv[: min(n, s.size)] = s[:n]
    power = sv**2
    # tail sums (no cancellation for the small errors at high rank), then f_full on top
    tail = np.concatenate([np.cumsum(power[::-1])[::-1], [0.0]])
    full = max(prob.yy - float(power.sum()), 0.0)
    errors = full + tail
    return RankCurve(ranks=np.arange(n + 1), errors=errors, singular_values=sv, full_objective=full,
                     scale=prob.yy, solve_time=time.perf_counter() - start)


def select_rank(prob: LayerProblem, rank: int) -> RankSelection:
    """The optimal map of rank at most ``rank`` (closed form), as two factors.

    .. math::

        \\min_{W:\\ \\operatorname{rank} W \\le r} \\|Y - XW\\|_F^2 + \\rho \\|W\\|_F^2,
        \\qquad W^* = H^{-1/2}\\, U_r \\Sigma_r V_r^T,\\quad H^{-1/2} B = U \\Sigma V^T,\\ H = G + \\rho I.

    Parameters
    ----------
    prob : LayerProblem
        Its ``group_size`` plays no role: the rank is that of the whole ``(C*g, n_out)`` matrix.
    rank : int
        ``0 <= rank <= min(C*g, n_out)``.

    Returns
    -------
    RankSelection
        ``left`` (C*g, r), ``right`` (r, n_out) with ``left @ right = W*``; ``objective`` is ``prob``'s
        objective of ``W*`` (:func:`map_objective`), status ``"optimal"``. When the whitened cross term
        has fewer than ``rank`` nonzero singular values the factors still have ``rank`` columns (the
        extra ones scaled by zero singular values).
    """
    start = time.perf_counter()
    prob = _check_problem(prob)
    rank = check_integer(rank, "rank", 0, _max_rank(prob))
    t, u, s, vt = _whitened_svd(prob)
    m = min(rank, s.size)
    left = np.zeros((prob.n_features, rank))
    right = np.zeros((rank, prob.n_outputs))
    left[:, :m] = t @ u[:, :m]
    right[:m] = s[:m, None] * vt[:m]
    objective = map_objective(prob, left @ right)
    curve = rank_curve(prob)
    bound = min(float(curve.errors[rank]), objective)
    # relative to the objective, with a floor at the rounding level of the direct formula (eps x cond x yy)
    gap = max(objective - bound, 0.0) / max(abs(objective), 1e-9 * prob.yy, np.finfo(float).tiny)
    return RankSelection(rank=rank, left=left, right=right, objective=objective, bound=bound, gap=gap,
                         status=OPTIMAL, singular_values=s.copy(), solve_time=time.perf_counter() - start,
                         message=f"optimal: closed form (whitened truncated SVD), rank {rank} of {s.size}")
