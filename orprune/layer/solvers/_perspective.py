"""Perspective splits, the perspective relaxation and its cuts (the bounding core of ``exact``).

For a (reduced) problem ``e0 - tr(R_T^T P_TT^{-1} R_T)`` over ``|T| = m`` channels, with
``P`` positive definite, and any block-diagonal split ``0 <= D = blkdiag(D_c) <= P``:

.. math::

    F_D(z) = \\min_W\\; e_0 - 2\\langle R, W\\rangle + \\operatorname{tr}(W^T (P - D) W)
             + \\sum_c \\operatorname{tr}(W_c^T D_c W_c) / z_c

is convex on ``[0, 1]^U`` and equals the error of ``T`` at ``z = 1_T``. For any ``V``,
Fenchel's inequality ``tr(W^T D W)/z >= 2<V, D W> - z tr(V^T D V)`` gives the *dual cut*

.. math::

    F_D(z) \\ge q(V) - \\sum_c z_c\\, s_c(V),\\quad
    q(V) = e_0 - \\operatorname{tr}((R - DV)^T (P - D)^{-1} (R - DV)),\\quad
    s_c(V) = \\operatorname{tr}(V_c^T D_c V_c),

valid for every ``z``; ``V = W(z)/z`` makes it tangent at ``z``. Minimising the right-hand
side over ``{0 <= z <= 1, sum z = m}`` is a lower bound on every completion. See
``formulations/outer_approximation.md`` for the derivation and why the *precision split*
``D_c = (P^{-1})_{cc}^{-1} / tau`` is the default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["SPLITS", "blocks_of", "block_congruence", "block_quadratic", "solve_spd", "spd_inverse", "perspective_split", "capped_simplex_weights",
           "Relaxation", "perspective_relaxation", "top_sum"]

#: Names of the block-diagonal splits ``D <= P`` (see :func:`perspective_split`).
SPLITS = ("precision", "block", "uniform", "ridge")

# D is shrunk by this factor so that P - D stays positive semidefinite after rounding.
_SHRINK = 1.0 - 1e-7


def blocks_of(matrix: np.ndarray, g: int) -> np.ndarray:
    """Diagonal ``g x g`` blocks of a square matrix, shape ``(n, g, g)``."""
    n = matrix.shape[0] // g
    return matrix.reshape(n, g, n, g)[np.arange(n), :, np.arange(n), :]


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix (Cholesky); ``LinAlgError`` otherwise."""
    factor, info = scipy.linalg.lapack.dpotrf(matrix, lower=True, clean=True)
    if info != 0:
        raise np.linalg.LinAlgError("matrix is not positive definite")
    inverse, info = scipy.linalg.lapack.dpotri(factor, lower=True)
    if info != 0:
        raise np.linalg.LinAlgError("matrix is not positive definite")
    return np.tril(inverse) + np.tril(inverse, -1).T


def perspective_split(P: np.ndarray, g: int, kind: str = "precision", *, ridge: float = 0.0,
                      P_inv: np.ndarray | None = None) -> np.ndarray:
    """Blocks ``D_c`` of a block-diagonal ``D`` with ``0 <= D <= P``.

    Parameters
    ----------
    P : ndarray, shape (n*g, n*g), positive definite
    g : int
    kind : {"precision", "block", "uniform", "ridge"}
        ``"precision"``: ``D_c = ((P^{-1})_{cc})^{-1} / tau`` with ``tau`` the largest
        eigenvalue of ``P^{-1}`` against ``blkdiag((P^{-1})_{cc})``. ``"block"``:
        ``D_c = t P_cc`` with ``t`` the smallest eigenvalue of ``P`` against ``blkdiag(P_cc)``.
        ``"uniform"``: ``lambda_min(P) I``. ``"ridge"``: ``ridge * I`` (plain outer approximation).
    ridge : float
        Used by ``"ridge"`` only; ``P`` must dominate ``ridge * I`` (Schur complements of
        ``G + rI`` do).
    P_inv : ndarray, optional
        ``P^{-1}`` if already known.

    Returns
    -------
    ndarray, shape (n, g, g)
    """
    n = P.shape[0] // g
    if kind == "ridge":
        return np.broadcast_to(ridge * np.eye(g), (n, g, g)).copy()
    if kind == "uniform":
        lam = float(scipy.linalg.eigvalsh(P, subset_by_index=[0, 0])[0])
        return np.broadcast_to(max(lam, 0.0) * _SHRINK * np.eye(g), (n, g, g)).copy()
    if kind == "block":
        base = blocks_of(P, g)
    elif kind == "precision":
        M = spd_inverse(P) if P_inv is None else P_inv
        base = blocks_of(M, g)
    else:
        raise ValueError(f"`split` must be one of {SPLITS}, got {kind!r}.")
    # Whiten by the block Cholesky factors: the extreme eigenvalue of the whitened matrix is the
    # generalized eigenvalue against the block diagonal.
    inv_factors = np.linalg.inv(np.linalg.cholesky(base))
    source = P if kind == "block" else M
    whitened = block_congruence(source, inv_factors)
    if kind == "block":
        t = float(scipy.linalg.eigvalsh(whitened, subset_by_index=[0, 0])[0])
        return max(t, 0.0) * _SHRINK * base
    tau = float(scipy.linalg.eigvalsh(whitened, subset_by_index=[n * g - 1, n * g - 1])[0])
    # (tau blkdiag(M_cc)) >= M  <=>  blkdiag(M_cc^{-1}) / tau <= M^{-1} = P.
    return (_SHRINK / max(tau, 1.0)) * np.linalg.inv(base)


def block_congruence(matrix: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """``L A L^T`` for ``L = blkdiag(factors)`` (``factors`` of shape ``(n, g, g)``)."""
    n, g = factors.shape[0], factors.shape[1]
    left = np.matmul(factors, matrix.reshape(n, g, n * g))  # (n, g, n*g)
    right = np.matmul(left.reshape(n * g, n, g).transpose(1, 0, 2), factors.transpose(0, 2, 1))
    return right.transpose(1, 0, 2).reshape(n * g, n * g)


def block_quadratic(blocks: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``tr(W_c^T A_c W_c)`` for every block ``A_c`` (shape (n, g, g)) and ``W`` of shape (n*g, o)."""
    Wb = W.reshape(blocks.shape[0], blocks.shape[1], -1)
    return np.sum(Wb * np.matmul(blocks, Wb), axis=(1, 2))


def solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``matrix^{-1} rhs`` by Cholesky; ``LinAlgError`` if ``matrix`` is not positive definite."""
    factor, info = scipy.linalg.lapack.dpotrf(matrix, lower=True, clean=False)
    if info != 0:
        raise np.linalg.LinAlgError("matrix is not positive definite")
    solution, info = scipy.linalg.lapack.dpotrs(factor, rhs, lower=True)
    if info != 0:
        raise np.linalg.LinAlgError("Cholesky solve failed")
    return solution


def top_sum(values: np.ndarray, m: int) -> float:
    """Sum of the ``m`` largest entries (0 for ``m <= 0``)."""
    if m <= 0:
        return 0.0
    if m >= values.size:
        return float(values.sum())
    return float(np.partition(values, values.size - m)[values.size - m:].sum())


def capped_simplex_weights(a: np.ndarray, m: int, floor: float = 0.0) -> np.ndarray:
    """``argmin sum_c a_c^2 / z_c`` over ``{0 <= z <= 1, sum z = m}`` (``a >= 0``), then ``>= floor``.

    The minimiser is ``z_c = min(1, a_c / rho)``: the ``r`` largest entries are capped at 1 and
    ``rho = (sum of the others) / (m - r)`` for the smallest consistent ``r``. Raising entries
    to ``floor`` afterwards keeps every later dual point finite; the bounds stay valid for any
    ``z > 0``.
    """
    n = a.size
    if m >= n:
        return np.ones(n)
    order = np.argsort(-a)
    ranked = a[order]
    tails = np.cumsum(ranked[::-1])[::-1]  # tails[r] = sum of ranked[r:]
    z = np.zeros(n)
    for r in range(m):
        if tails[r] <= 0.0:  # fewer than m positive entries: spread the rest evenly
            z[order[:r]] = 1.0
            z[order[r:]] = (m - r) / (n - r)
            break
        rho = tails[r] / (m - r)
        if ranked[r] <= rho:
            z[order] = np.minimum(1.0, ranked / rho)
            z[order[:r]] = 1.0
            break
    else:
        z[order[:m]] = 1.0
    return np.maximum(z, floor)


@dataclass
class Relaxation:
    """Outcome of :func:`perspective_relaxation`.

    ``bound`` is a valid lower bound on every completion; the dual cut behind it is
    ``error >= constant - slopes @ z`` for every ``z`` in ``[0, 1]^U``.
    """

    bound: float
    primal: float
    z: np.ndarray
    constant: float
    slopes: np.ndarray
    iterations: int


def perspective_relaxation(
    P: np.ndarray,
    R: np.ndarray,
    e0: float,
    D: np.ndarray,
    m: int,
    *,
    cutoff: float = np.inf,
    max_iter: int = 30,
    rel_tol: float = 1e-3,
    z0: np.ndarray | None = None,
    deadline: float | None = None,
    cuts: list | None = None,
) -> Relaxation:
    """Lower bound ``min { F_D(z) : 0 <= z <= 1, sum z = m }`` by alternating minimisation.

    Each iteration solves ``(P - D + blkdiag(D_c / z_c)) W = R`` (the minimiser of ``F_D`` at
    ``z``), reads the dual point ``V_c = W_c / z_c``, evaluates the dual bound

    .. math:: L(V) = e_0 - \\operatorname{tr}(W^T (P - D) W) - \\text{sum of the } m
              \\text{ largest } s_c(V)

    (valid because ``R - DV = (P - D) W`` exactly), then moves ``z`` to the minimiser of
    ``sum_c tr(W_c^T D_c W_c) / z_c``. Stops when the bound reaches ``cutoff``, when the
    primal-dual gap is below ``rel_tol``, after ``max_iter`` iterations, or at ``deadline``.
    The cut ``(constant, slopes)`` of every iterate is appended to ``cuts`` when given.
    """
    n, g = D.shape[0], D.shape[1]
    PD = P.copy()
    idx = np.arange(n)
    PD_view = PD.reshape(n, g, n, g)
    PD_view[idx, :, idx, :] -= D
    z = np.full(n, m / n) if z0 is None else np.clip(z0, 1e-4, 1.0)
    floor = 1e-4
    best = Relaxation(-np.inf, np.inf, z.copy(), -np.inf, np.zeros(n), 0)
    primal = np.inf
    for it in range(1, max_iter + 1):
        Mz = PD.copy()
        Mz.reshape(n, g, n, g)[idx, :, idx, :] += D / z[:, None, None]
        try:
            W = solve_spd(Mz, R)
        except np.linalg.LinAlgError:
            break
        s_w = block_quadratic(D, W)
        slopes = s_w / z**2
        constant = e0 - float(np.sum(W * (PD @ W)))
        bound = constant - top_sum(slopes, m)
        if cuts is not None:
            cuts.append((constant, slopes))
        primal = min(primal, e0 - float(np.sum(R * W)))
        if bound > best.bound:
            best = Relaxation(bound, primal, z.copy(), constant, slopes, it)
        best.primal, best.iterations = primal, it
        if best.bound >= cutoff or primal - best.bound <= rel_tol * max(abs(primal), 1e-300):
            break
        if deadline is not None and time.perf_counter() > deadline:
            break
        z = capped_simplex_weights(np.sqrt(np.maximum(s_w, 0.0)), m, floor)
    return best
