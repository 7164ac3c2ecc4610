r"""The spatial low-rank scheme of a conv layer (``kh x 1`` then ``1 x kw``) by alternating least squares.

A conv with ``C`` input and ``N`` output channels and a ``kh x kw`` kernel becomes a ``kh x 1`` conv from ``C`` to
``r`` channels (``vertical``, shape ``(r, C, kh)``) and a ``1 x kw`` conv from ``r`` to ``N`` (``horizontal``,
shape ``(N, r, kw)``). The composite's weights are

.. math:: W[n, c, i, j] = \sum_t V[t, c, i]\, Z[n, t, j],

i.e. the map reshaped to ``(C kh) x (kw N)`` has rank ``r``. The layer objective
:math:`F(W) = \|Y\|^2 - 2\operatorname{tr}(W^T B) + \operatorname{tr}(W^T H W)` (``H = G + ridge I``) does not
whiten across that reshape, so there is no closed form (weighted low-rank approximation). Each factor alone is a
least-squares problem: for a fixed ``V`` the second layer is a layer problem over ``r kw`` features (solved
exactly), for a fixed ``Z`` the first is a convex quadratic in ``V`` (conjugate gradients from the current ``V``).
Both steps never increase ``F``. Status ``"feasible"``; the bound is certified: ``W`` has (ordinary) rank at most
``r kw``, so ``F >= e(min(r kw, C kh kw, N))`` of :func:`orprune.rank_curve`. ``formulations/low_rank.md``,
section 12.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from orprune._status import FEASIBLE
from orprune._validation import check_integer
from orprune.layer.low_rank import map_objective, rank_curve
from orprune.layer.problem import LayerProblem
from orprune.layer.result import SolverResult

__all__ = ["SpatialSelection", "select_spatial_rank", "spatial_weights"]


def spatial_weights(vertical: np.ndarray, horizontal: np.ndarray) -> np.ndarray:
    """The ``(C*kh*kw, N)`` map (rows ``(c, i, j)``, the layout of ``LayerProblem``) of the two factors."""
    return np.einsum("tci,ntj->cijn", vertical, horizontal).reshape(-1, horizontal.shape[0])


@dataclass(frozen=True)
class SpatialSelection(SolverResult):
    """A conv layer's spatial rank-``r`` factors and their objective.

    Attributes
    ----------
    rank : int
    vertical : ndarray, shape (r, C, kh)
        The ``kh x 1`` conv from ``C`` to ``r`` channels.
    horizontal : ndarray, shape (N, r, kw)
        The ``1 x kw`` conv from ``r`` to ``N`` channels.
    objective : float
        ``prob``'s objective of :attr:`weights` (:func:`orprune.map_objective`).
    bound : float
        ``e(min(r kw, max rank))`` of the channel-wise rank curve: no spatial rank-``r`` map does better.
    gap : float
        ``(objective - bound) / objective``.
    status : str
        ``"feasible"`` (alternating least squares: a local solution).
    objectives : ndarray
        The objective after the start and after each sweep (non-increasing).
    solve_time : float
    message : str
    """

    rank: int
    vertical: np.ndarray
    horizontal: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    objectives: np.ndarray
    solve_time: float
    message: str = ""

    @property
    def weights(self) -> np.ndarray:
        return spatial_weights(self.vertical, self.horizontal)


def _solve_psd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """A minimiser of ``x^T M x - 2 x^T rhs`` for PSD ``M`` (minimum-norm, eigenvalues below 1e-12 max cut)."""
    lam, q = np.linalg.eigh(matrix)
    keep = lam > 1e-12 * max(float(lam[-1]), np.finfo(float).tiny)
    return q[:, keep] @ ((q[:, keep].T @ rhs) / lam[keep, None])


def select_spatial_rank(prob: LayerProblem, rank: int, *, channels: int, kernel: tuple[int, int],
                        sweeps: int = 30, cg_steps: int = 20, tol: float = 1e-9) -> SpatialSelection:
    """Spatial rank-``rank`` factors of a conv layer's problem (``kh x 1`` then ``1 x kw``), by alternation.

    Parameters
    ----------
    prob : LayerProblem
        Of a conv with ``channels`` inputs and a ``kernel`` = ``(kh, kw)`` kernel: features ``(c, i, j)``.
    rank : int
        ``1 <= rank <= min(C kh, kw N)``.
    sweeps : int, default 30
        At most this many (``Z`` step, ``V`` step) pairs; stops earlier when a sweep improves the objective by
        less than ``tol`` relative.
    cg_steps : int, default 20
        Conjugate-gradient steps of each ``V`` step (from the current ``V``: each step decreases the quadratic).

    Returns
    -------
    SpatialSelection
        Started from the truncated SVD of the unconstrained refit reshaped to ``(C kh) x (kw N)``.
    """
    start = time.perf_counter()
    if not isinstance(prob, LayerProblem):
        raise ValueError(f"`prob` must be a LayerProblem, got {type(prob).__name__}.")
    if not (isinstance(kernel, tuple) and len(kernel) == 2):
        raise ValueError(f"`kernel` must be a (kh, kw) tuple, got {kernel!r}.")
    kh, kw = (check_integer(k, "kernel", 1, prob.n_features) for k in kernel)
    c = check_integer(channels, "channels", 1, prob.n_features)
    if c * kh * kw != prob.n_features:
        raise ValueError(f"`channels` x kh x kw = {c * kh * kw} must equal the problem's {prob.n_features} features.")
    n, p = prob.n_outputs, c * kh
    rank = check_integer(rank, "rank", 1, min(p, kw * n))
    sweeps, cg_steps = check_integer(sweeps, "sweeps", 1, 10**6), check_integer(cg_steps, "cg_steps", 1, 10**6)
    h = (prob.gram + prob.ridge * np.eye(prob.n_features)).reshape(p, kw, p, kw)
    cross = prob.cross.reshape(p, kw, n)
    # start: the unconstrained refit (rank r kw is enough for it) reshaped and truncated
    full = _solve_psd(prob.gram + prob.ridge * np.eye(prob.n_features), prob.cross).reshape(p, kw * n)
    u, s, vt = np.linalg.svd(full, full_matrices=False)
    v = u[:, :rank].T * np.sqrt(s[:rank, None])  # (r, p)
    z = (np.sqrt(s[:rank, None]) * vt[:rank]).reshape(rank, kw, n)  # (r, kw, n)

    def objective(v: np.ndarray, z: np.ndarray) -> float:
        return map_objective(prob, np.einsum("tp,tjn->pjn", v, z).reshape(-1, n))

    history = [objective(v, z)]
    for _ in range(sweeps):
        # Z step: features (t, j) = sum_p V[t, p] x[(p, j)]: exact least squares
        gz = np.einsum("tp,pjqk,sq->tjsk", v, h, v, optimize=True).reshape(rank * kw, rank * kw)
        bz = np.einsum("tp,pjn->tjn", v, cross).reshape(rank * kw, n)
        z = _solve_psd(gz, bz).reshape(rank, kw, n)
        # V step: the quadratic a^T Q a - 2 R.a in V, by conjugate gradients from the current V
        zz = np.einsum("tjn,skn->tjsk", z, z)
        rhs = np.einsum("tjn,pjn->tp", z, cross)

        def apply_q(a: np.ndarray) -> np.ndarray:
            return np.einsum("pjqk,tjsk,sq->tp", h, zz, a, optimize=True)

        resid = rhs - apply_q(v)
        direction = resid.copy()
        rr = float(np.sum(resid * resid))
        for _ in range(cg_steps):
            if rr <= 1e-30:
                break
            qd = apply_q(direction)
            curvature = float(np.sum(direction * qd))
            if curvature <= 0:
                break
            step = rr / curvature
            v = v + step * direction
            resid = resid - step * qd
            rr, rr_old = float(np.sum(resid * resid)), rr
            direction = resid + (rr / rr_old) * direction
        history.append(objective(v, z))
        if history[-2] - history[-1] <= tol * max(abs(history[-2]), np.finfo(float).tiny):
            break
    vertical = v.reshape(rank, c, kh)
    horizontal = np.transpose(z, (2, 0, 1))  # (n, r, kw)
    value = map_objective(prob, spatial_weights(vertical, horizontal))
    curve = rank_curve(prob)
    bound = min(float(curve.errors[min(rank * kw, curve.max_rank)]), value)
    gap = max(value - bound, 0.0) / max(abs(value), 1e-9 * prob.yy, np.finfo(float).tiny)
    return SpatialSelection(rank=rank, vertical=vertical, horizontal=horizontal, objective=value, bound=bound,
                            gap=gap, status=FEASIBLE, objectives=np.array(history), solve_time=time.perf_counter() - start,
                            message=f"alternating least squares, {len(history) - 1} sweeps")
