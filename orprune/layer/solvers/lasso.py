"""He et al. (2017) channel selection: LASSO on per-channel scalars, bisection on the penalty.

The layer's weights ``W`` are fixed (``prob.weights``, else the least-squares weights with every
channel kept) and channel ``c`` contributes ``Z_c = X_c W_c`` to the output. Scalars ``beta``
weigh the contributions:

.. math::

    \\min_\\beta \\|Y - \\sum_c \\beta_c Z_c\\|_F^2 + \\lambda \\|\\beta\\|_1
    = \\|Y\\|^2 - 2 q^T \\beta + \\beta^T Q \\beta + \\lambda \\|\\beta\\|_1,

with ``Q_cd = tr(W_c^T G_cd W_d)`` and ``q_c = tr(W_c^T B_c)``: a ``C x C`` problem built from
the statistics alone. ``lambda`` is bisected (geometrically) until exactly ``k`` scalars are
nonzero; the kept channels are then refit by least squares. See
``formulations/lasso_selection.md``.
"""

from __future__ import annotations

import time

import numpy as np

from orprune.layer.problem import LayerProblem
from orprune.layer.solvers.registry import heuristic_selection, register_solver

__all__ = ["contribution_statistics", "lasso_coordinate_descent", "lasso_select"]


def contribution_statistics(prob: LayerProblem, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``Q`` (C, C) and ``q`` (C,): Gram and cross terms of the channel contributions ``X_c W_c``."""
    C, g = prob.n_channels, prob.group_size
    if weights is None:
        W = prob.weights if prob.weights is not None else prob.full_weights
    else:
        W = np.asarray(weights, dtype=float)
        W = W[:, None] if W.ndim == 1 else W
        if W.shape != prob.cross.shape or not np.all(np.isfinite(W)):
            raise ValueError(f"`weights` must be finite with the shape of `prob.cross` {prob.cross.shape}.")
    blocks = W.reshape(C, g, -1)  # W_c
    G4 = prob.gram.reshape(C, g, C, g)  # G_cd = G4[c, :, d, :]
    Q = np.einsum("cgo,cgdh,dho->cd", blocks, G4, blocks, optimize=True)
    q = np.einsum("cgo,cgo->c", blocks, prob.cross.reshape(C, g, -1))
    return 0.5 * (Q + Q.T), q


def lasso_coordinate_descent(
    Q: np.ndarray,
    q: np.ndarray,
    lam: float,
    beta: np.ndarray | None = None,
    *,
    tol: float = 1e-12,
    max_sweeps: int = 10_000,
) -> tuple[np.ndarray, int]:
    """Minimise ``beta^T Q beta - 2 q^T beta + lam ||beta||_1`` by cyclic coordinate descent.

    Each update is an exact one-dimensional minimisation (a soft threshold), so coefficients are
    exactly zero where the optimality condition ``|q_c - (Q beta)_c + Q_cc beta_c| <= lam / 2``
    holds. Keeping ``Q beta`` up to date makes a sweep ``O(C^2)``; warm starts along the
    bisection make most solves a few sweeps. Stops when the largest change of a contribution,
    ``sqrt(Q_cc) |delta beta_c|``, falls below ``tol`` (relative to ``sqrt(max Q_cc)``).

    Returns
    -------
    beta : ndarray, shape (C,)
    sweeps : int
    """
    C = len(q)
    beta = np.zeros(C) if beta is None else np.asarray(beta, dtype=float).copy()
    diag = np.diag(Q).copy()
    scale = np.sqrt(np.maximum(diag, 0.0))
    threshold = tol * max(float(scale.max()), np.finfo(float).tiny)
    Qb = Q @ beta
    half = 0.5 * lam
    for sweep in range(1, max_sweeps + 1):
        largest = 0.0
        for c in range(C):
            if diag[c] <= 0.0:
                if beta[c] != 0.0:
                    Qb -= Q[:, c] * beta[c]
                    beta[c] = 0.0
                continue
            rho = q[c] - Qb[c] + diag[c] * beta[c]
            new = np.sign(rho) * max(abs(rho) - half, 0.0) / diag[c]
            delta = new - beta[c]
            if delta != 0.0:
                Qb += Q[:, c] * delta
                beta[c] = new
                largest = max(largest, abs(delta) * scale[c])
        if largest <= threshold:
            return beta, sweep
    return beta, max_sweeps


def lasso_select(
    prob: LayerProblem, k: int, *, weights: np.ndarray | None = None, max_bisections: int = 100
) -> tuple[np.ndarray, dict]:
    """Channels chosen by bisection on ``lambda`` until exactly ``k`` coefficients are nonzero.

    The number of nonzeros is not monotone in ``lambda`` in general and two channels can enter
    at the same ``lambda``; when no ``lambda`` isolates ``k`` within ``max_bisections`` steps, the
    solution with the fewest nonzeros above ``k`` is ranked by ``|beta|`` (ties: lower index).

    Returns
    -------
    mask : ndarray of bool, shape (C,)
    info : dict
        ``lambda``, ``beta``, ``bisections``, ``sweeps``, ``exact_count`` (False when the
        ranking fallback was used).
    """
    C = prob.n_channels
    Q, q = contribution_statistics(prob, weights)
    s = 1.0 / max(prob.yy, np.finfo(float).tiny)  # scale-free: lambda relative to ||Y||^2
    Q, q = Q * s, q * s
    lam_max = 2.0 * float(np.max(np.abs(q)))  # beta = 0 is optimal for lambda >= lam_max
    if lam_max <= 0.0:  # no channel correlates with Y: rank nothing, keep the first k
        mask = np.zeros(C, dtype=bool)
        mask[:k] = True
        return mask, {"lambda": 0.0, "beta": np.zeros(C), "bisections": 0, "sweeps": 0, "exact_count": False}
    # Lower lambda geometrically until at least k coefficients are active.
    hi, lam, sweeps = lam_max, lam_max, 0
    beta = np.zeros(C)
    while True:
        lam *= 1e-2
        beta, n = lasso_coordinate_descent(Q, q, lam, beta)
        sweeps += n
        if np.count_nonzero(beta) >= k or lam < lam_max * 1e-14:
            break
        hi = lam
    bisections, above = 0, None  # `above`: the solution with the fewest nonzeros above k
    exact = np.count_nonzero(beta) == k
    if np.count_nonzero(beta) > k:
        lo, beta_lo, above = lam, beta, beta
        while bisections < max_bisections and hi / lo - 1.0 > 1e-12:
            bisections += 1
            lam = float(np.sqrt(lo * hi))
            beta, n = lasso_coordinate_descent(Q, q, lam, beta_lo)
            sweeps += n
            count = np.count_nonzero(beta)
            if count == k:
                exact = True
                break
            if count > k:
                lo, beta_lo = lam, beta
                if count <= np.count_nonzero(above):
                    above = beta
            else:
                hi = lam
    if not exact and above is not None:
        beta = above
    keep = np.argsort(-np.abs(beta), kind="stable")[:k]
    mask = np.zeros(C, dtype=bool)
    mask[keep] = True
    info = {"lambda": lam * prob.yy, "beta": beta, "bisections": bisections, "sweeps": sweeps, "exact_count": exact}
    return mask, info


@register_solver("lasso", exact=False, description="He et al. LASSO on channel contributions, bisection to k")
def solve_lasso(prob: LayerProblem, k: int, *, time_limit: float | None = None, weights: np.ndarray | None = None):
    """LASSO channel selection (He et al., 2017) with a least-squares refit; a heuristic."""
    start = time.perf_counter()
    mask, info = lasso_select(prob, k, weights=weights)
    return heuristic_selection(prob, mask, "lasso", start, info=info)
