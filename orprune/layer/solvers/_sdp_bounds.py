"""Semidefinite root relaxations of channel selection: the optimal separable split and a lifting.

For a (reduced) problem ``min { e0 - tr(R_T^T P_TT^{-1} R_T) : |T| = m }`` over ``n`` channels of
``g`` columns, written with weights ``W`` and keep indicators ``z``,

.. math::

    \\min_{z \\in \\{0,1\\}^n,\\ \\sum z = m,\\ W}\\ e_0 - 2\\langle R, W\\rangle + \\operatorname{tr}(W^T P W)
    \\quad\\text{s.t. } W_c = 0 \\text{ if } z_c = 0,

two semidefinite relaxations (cvxpy + SCS; root-only research tools, far too slow for the nodes
of :mod:`orprune.layer.solvers._bnb`). See ``formulations/root_relaxations.md``.

* :func:`optimal_split`: the lifted SDP whose value is ``max_D min_z F_D(z)`` over every block
  split ``0 <= D <= P`` (Dong, Chen and Linderoth); the optimal ``D`` is read off its dual,
  shrunk into validity, and the bound is certified by :func:`perspective_relaxation`.
* :func:`lifted_relaxation`: Shor's lifting of ``(1, z, w_o)`` for every output column ``o``
  with the RLT products ``z_c W_c = W_c`` and ``(sum z - m) W = 0``. Its value comes from SCS
  (accurate to the solver tolerance, not certified).
* :func:`removal_shor`: Shor's lifting of the removal indicators only, in the superset view
  ``cost(J) = tr(w_J^T (M_JJ)^{-1} w_J)``: one PSD block of size ``n g + n_out`` and one of size
  ``n + 1`` (against ``n_out`` blocks of ``1 + n + n g`` for the lifting above). Its dual gives a
  quadratic cut in the removal indicators, valid at every node (:func:`removal_cut`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from orprune.layer.solvers._perspective import perspective_relaxation

__all__ = ["SdpBound", "optimal_split", "lifted_relaxation", "removal_cut", "removal_shor", "shrink_split"]


@dataclass(frozen=True)
class SdpBound:
    """Outcome of a root SDP: ``value`` (SCS objective), ``bound`` (certified, or ``None``), ``z``,
    the split ``D`` (``optimal_split`` only), cvxpy ``status``."""

    value: float
    bound: float | None
    z: np.ndarray
    D: np.ndarray | None
    status: str


def shrink_split(P: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Make a candidate split valid: PSD blocks, then ``D * t`` with the largest ``t <= 1``
    such that ``P - t blkdiag(D) >= 0`` (``P`` positive definite)."""
    values, vectors = np.linalg.eigh(0.5 * (D + D.transpose(0, 2, 1)))
    D = np.einsum("cij,cj,ckj->cik", vectors, np.clip(values, 0.0, None), vectors)
    n_f = P.shape[0]
    top = float(scipy.linalg.eigh(scipy.linalg.block_diag(*D), P, eigvals_only=True,
                                  subset_by_index=[n_f - 1, n_f - 1])[0])
    return D * (min(1.0, (1.0 - 1e-7) / top) if top > 0 else 0.0)


def _solve(problem, eps: float, max_iters: int) -> str:
    problem.solve(solver="SCS", eps_abs=eps, eps_rel=eps, max_iters=max_iters)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"the root SDP failed: cvxpy status {problem.status!r}.")
    return problem.status


def _perspective_constraints(cp, W, X, z, g: int, n_out: int) -> list:
    """``[[z_c I, W_c^T], [W_c, X_cc]] >= 0``: ``X_cc >= W_c W_c^T / z_c`` for every channel."""
    rows = [slice(c * g, (c + 1) * g) for c in range(z.shape[0])]
    return [cp.bmat([[z[c] * np.eye(n_out), W[s].T], [W[s], X[s, s]]]) >> 0 for c, s in enumerate(rows)]


def optimal_split(P: np.ndarray, R: np.ndarray, e0: float, g: int, m: int, *, eps: float = 1e-7,
                  max_iters: int = 50_000) -> SdpBound:
    """Best block-separable perspective bound and its split.

    .. math::

        \\min_{W, X, z}\\ e_0 - 2\\langle R, W\\rangle + \\langle P, X\\rangle\\quad\\text{s.t.}\\quad
        \\begin{bmatrix} I & W^T \\\\ W & X \\end{bmatrix} \\succeq 0,\\
        \\begin{bmatrix} z_c I & W_c^T \\\\ W_c & X_{cc} \\end{bmatrix} \\succeq 0,\\
        0 \\le z \\le 1,\\ \\sum z = m.

    The dual block of the ``c``-th perspective constraint facing ``X_cc`` is ``D_c``. ``P`` must
    be positive definite (otherwise ``D = 0`` and the bound is the value with every channel).
    """
    import cvxpy as cp

    n_f, n_out = R.shape
    n = n_f // g
    W = cp.Variable((n_f, n_out))
    X = cp.Variable((n_f, n_f), symmetric=True)
    z = cp.Variable(n)
    per = _perspective_constraints(cp, W, X, z, g, n_out)
    constraints = [cp.bmat([[np.eye(n_out), W.T], [W, X]]) >> 0, z >= 0, z <= 1, cp.sum(z) == m] + per
    problem = cp.Problem(cp.Minimize(e0 - 2 * cp.sum(cp.multiply(R, W)) + cp.trace(P @ X)), constraints)
    status = _solve(problem, eps, max_iters)
    D = np.array([np.asarray(c.dual_value)[n_out:, n_out:] for c in per])
    try:
        np.linalg.cholesky(P)
        D = shrink_split(P, D)
    except np.linalg.LinAlgError:
        D = np.zeros((n, g, g))
    rel = perspective_relaxation(P, R, e0, D, m, max_iter=5000, rel_tol=1e-8)
    full = e0 - float(np.sum(R * np.linalg.lstsq(P, R, rcond=None)[0]))  # every channel kept
    return SdpBound(float(problem.value), max(rel.bound, full), np.asarray(z.value), D, status)


def lifted_relaxation(P: np.ndarray, R: np.ndarray, e0: float, g: int, m: int, *, eps: float = 1e-7,
                      max_iters: int = 50_000) -> SdpBound:
    """Shor + RLT relaxation, one moment matrix per output column ``o``.

    .. math::

        \\begin{bmatrix} 1 & z^T & w_o^T \\\\ z & Z & U_o^T \\\\ w_o & U_o & X_o \\end{bmatrix}
        \\succeq 0,\\quad (U_o)_{c\\text{-rows},\\,c} = (w_o)_c,\\quad U_o 1 = m\\, w_o,\\quad
        \\operatorname{diag} Z = z,\\quad Z 1 = m z,\\quad
        \\max(0, z_c + z_d - 1) \\le Z_{cd} \\le \\min(z_c, z_d),

    with the perspective constraints of :func:`optimal_split` on ``X = sum_o X_o``, objective
    ``e0 - 2<R, W> + <P, X>``. At a binary ``z`` the point ``Z = z z^T``, ``U_o = w_o z^T``,
    ``X_o = w_o w_o^T`` is feasible with the true error, so the value is a lower bound (to the
    accuracy of SCS; ``bound`` is ``None``).
    """
    import cvxpy as cp

    n_f, n_out = R.shape
    n = n_f // g
    z = cp.Variable(n)
    Z = cp.Variable((n, n), symmetric=True)
    W = cp.Variable((n_f, n_out))
    row, col = cp.reshape(z, (1, n), order="F"), cp.reshape(z, (n, 1), order="F")
    ones = np.ones((n, 1))
    constraints = [cp.diag(Z) == z, cp.sum(Z, axis=1) == m * z, z >= 0, z <= 1, cp.sum(z) == m,
                   Z >= 0, Z <= ones @ row, Z >= ones @ row + col @ ones.T - 1]
    blocks = []
    for o in range(n_out):
        U = cp.Variable((n_f, n))
        Xo = cp.Variable((n_f, n_f), symmetric=True)
        w = W[:, o:o + 1]
        constraints.append(cp.bmat([[np.ones((1, 1)), row, w.T], [col, Z, U.T], [w, U, Xo]]) >> 0)
        constraints += [U[c * g:(c + 1) * g, c] == W[c * g:(c + 1) * g, o] for c in range(n)]
        constraints.append(cp.sum(U, axis=1) == m * W[:, o])
        blocks.append(Xo)
    X = sum(blocks)
    constraints += _perspective_constraints(cp, W, X, z, g, n_out)
    problem = cp.Problem(cp.Minimize(e0 - 2 * cp.sum(cp.multiply(R, W)) + cp.trace(P @ X)), constraints)
    status = _solve(problem, eps, max_iters)
    return SdpBound(float(problem.value), None, np.asarray(z.value), None, status)


def _indicator_moments(cp, n: int, d: int):
    """Shor's moment matrix of ``(1, x)`` for ``x in {0, 1}^n, sum x = d``, with the RLT products."""
    x = cp.Variable(n)
    X = cp.Variable((n, n), symmetric=True)
    row, col = cp.reshape(x, (1, n), order="C"), cp.reshape(x, (n, 1), order="C")
    ones = np.ones((n, 1))
    constraints = [cp.bmat([[np.ones((1, 1)), row], [col, X]]) >> 0, cp.diag(X) == x, cp.sum(X, axis=1) == d * x,
                   cp.sum(x) == d, x >= 0, x <= 1, X >= 0, X <= ones @ row, X >= ones @ row + col @ ones.T - 1]
    return x, X, constraints


def removal_cut(P: np.ndarray, R: np.ndarray, g: int, V: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``(fA, a, Q)`` with ``f(A minus J) >= fA + a^T x - x^T Q x`` for every removal set ``J`` (``x`` its indicator).

    ``M = P^{-1}``, ``w = M R``, ``fA`` the value with every channel of ``P``; for any ``V`` (shape of ``R``)
    ``a_c = 2<V_c, w_c>`` and ``Q_cd = <V_c, M_cd V_d>`` (Fenchel: ``tr(w_J^T M_JJ^{-1} w_J) >=
    2<V_J, w_J> - <V_J, M_JJ V_J>``). ``P`` must be positive definite; ``fA`` is relative to ``e0 = 0``.
    """
    M = np.linalg.inv(P)
    M = 0.5 * (M + M.T)
    w = M @ R
    n = P.shape[0] // g
    Vb, wb = V.reshape(n, g, -1), w.reshape(n, g, -1)
    a = 2.0 * np.einsum("cgo,cgo->c", Vb, wb)
    Q = np.einsum("cgo,cgdh,dho->cd", Vb, M.reshape(n, g, n, g), Vb)
    return -float(np.sum(R * w)), a, 0.5 * (Q + Q.T)


def removal_shor(P: np.ndarray, R: np.ndarray, e0: float, g: int, m: int, *, eps: float = 1e-6,
                 max_iters: int = 50_000) -> tuple[SdpBound, np.ndarray]:
    """Shor relaxation of the removal view, and the dual ``V`` for :func:`removal_cut`.

    With ``M = P^{-1}``, ``w = M R``, ``d = n - m`` removals and ``E`` the ``(n g) x n`` channel
    expansion (``E X E^T`` repeats ``X_cd`` over the ``g x g`` block ``(c, d)``):

    .. math::

        \\min\\ e_0 - \\operatorname{tr}(R^T w) + \\operatorname{tr} T\\quad\\text{s.t.}\\quad
        \\begin{bmatrix} M \\circ (E X E^T) & \\operatorname{diag}(E x)\\, w \\\\
        w^T \\operatorname{diag}(E x) & T \\end{bmatrix} \\succeq 0,\\quad
        \\begin{bmatrix} 1 & x^T \\\\ x & X \\end{bmatrix} \\succeq 0,

    ``diag X = x``, ``X 1 = d x``, ``sum x = d``, ``max(0, x_c + x_d - 1) <= X_cd <= min(x_c, x_d)``.
    At the indicator ``x`` of a removal set ``J`` and ``X = x x^T`` the first block is ``M_JJ`` bordered
    by zeros and its smallest feasible ``tr T`` is ``cost(J)``, so the value is a lower bound (to the
    accuracy of SCS; ``bound`` is ``None``). ``z`` holds the relaxed keep indicators ``1 - x``.
    """
    import cvxpy as cp

    n_f, n_out = R.shape
    n = n_f // g
    M = np.linalg.inv(P)
    M = 0.5 * (M + M.T)
    w = M @ R
    x, X, constraints = _indicator_moments(cp, n, n - m)
    E = np.kron(np.eye(n), np.ones((g, 1)))
    T = cp.Variable((n_out, n_out), symmetric=True)
    Dw = cp.multiply((E @ cp.reshape(x, (n, 1), order="C")) @ np.ones((1, n_out)), w)
    lmi = cp.bmat([[cp.multiply(M, E @ X @ E.T), Dw], [Dw.T, T]]) >> 0
    problem = cp.Problem(cp.Minimize(e0 - float(np.sum(R * w)) + cp.trace(T)), constraints + [lmi])
    status = _solve(problem, eps, max_iters)
    V = -np.asarray(lmi.dual_value)[:n_f, n_f:]  # the Lagrangian term -2<Lambda_12, Dw>: V = -Lambda_12
    return SdpBound(float(problem.value), None, 1.0 - np.asarray(x.value), None, status), V
