"""Root SDP relaxations (optimal separable split, Shor + RLT lifting, removal-view Shor) against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from orprune.layer.problem import LayerProblem
from orprune.layer.solvers._perspective import perspective_relaxation, perspective_split
from tests.layer.instances import brute_force

pytest.importorskip("cvxpy")

from orprune.layer.solvers._sdp_bounds import (  # noqa: E402
    lifted_relaxation,
    optimal_split,
    removal_cut,
    removal_shor,
    shrink_split,
)


def _problem(rng, C, g, N, ridge, n_out=2):
    """Correlated channels (shared latent factors), the ``g`` columns of a channel near copies."""
    latent = rng.normal(size=(N, max(2, C // 2)))
    base = latent @ rng.normal(size=(latent.shape[1], C)) + 0.5 * rng.normal(size=(N, C))
    X = np.repeat(base, g, axis=1) + 0.3 * rng.normal(size=(N, C * g))
    Y = X @ rng.normal(size=(C * g, n_out)) + 0.05 * rng.normal(size=(N, n_out))
    return LayerProblem.from_arrays(X, Y, group_size=g, ridge=ridge)


# (C, g, k, N, ridge): g in {1, 9}, ridge 0 and > 0, full rank and rank deficient (N < C g).
CASES = [(6, 1, 3, 30, 0.0), (6, 1, 2, 4, 0.0), (5, 1, 3, 5, 0.1), (4, 9, 2, 108, 0.0),
         (4, 9, 2, 20, 0.0), (3, 9, 1, 60, 1e-2), (4, 9, 3, 20, 1.0)]


def _normalised(prob):
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    scale = float(np.mean(np.diag(H)))
    return H / scale, prob.cross / np.sqrt(scale * prob.yy)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sdp_bounds_are_valid_and_ordered(case):
    C, g, k, N, ridge = CASES[case]
    prob = _problem(np.random.default_rng(case), C, g, N, ridge)
    optimum = brute_force(prob, k)[0] / prob.yy
    H, B = _normalised(prob)
    full = prob.full_objective / prob.yy
    split = optimal_split(H, B, 1.0, g, k)
    lifted = lifted_relaxation(H, B, 1.0, g, k)
    tol = 1e-5  # SCS accuracy on the uncertified values
    assert full - 1e-9 <= split.bound <= optimum + 1e-9
    assert split.value <= optimum + tol
    assert lifted.value <= optimum + tol
    assert lifted.value >= split.value - tol  # the lifting keeps every constraint of the split SDP
    assert np.all(split.z >= -tol) and np.isclose(split.z.sum(), k, atol=1e-4)
    if np.linalg.eigvalsh(H)[0] > 1e-8:  # the certified split matches the SDP and beats precision
        precision = perspective_relaxation(H, B, 1.0, perspective_split(H, g, "precision"), k,
                                           max_iter=5000, rel_tol=1e-8).bound
        assert split.bound >= precision - 1e-4
        assert split.bound >= split.value - 1e-4


def test_shrunk_split_is_dominated_by_the_hessian():
    rng = np.random.default_rng(7)
    prob = _problem(rng, 4, 9, 80, 0.0)
    H, _ = _normalised(prob)
    D = shrink_split(H, rng.normal(size=(4, 9, 9)))
    assert np.all(np.linalg.eigvalsh(D) >= -1e-12)
    full = np.zeros_like(H)
    for c in range(4):
        full[c * 9:(c + 1) * 9, c * 9:(c + 1) * 9] = D[c]
    assert np.linalg.eigvalsh(H - full)[0] >= -1e-10


def test_lifted_relaxation_is_tight_on_orthogonal_channels():
    """Orthonormal channels: the error is separable and the lifting reaches the optimum."""
    rng = np.random.default_rng(3)
    X = np.linalg.qr(rng.normal(size=(40, 5)))[0] * 3.0
    Y = X @ rng.normal(size=(5, 2))
    prob = LayerProblem.from_arrays(X, Y, group_size=1)
    optimum = brute_force(prob, 2)[0] / prob.yy
    H, B = _normalised(prob)
    assert lifted_relaxation(H, B, 1.0, 1, 2).value == pytest.approx(optimum, abs=1e-5)


def _subset_errors(prob, k):
    """``f(S) / ||Y||^2`` and the removal indicator of every ``S`` with ``|S| = k``."""
    values, removed = [], []
    for S in itertools.combinations(range(prob.n_channels), k):
        mask = np.zeros(prob.n_channels, bool)
        mask[list(S)] = True
        values.append(prob.objective(mask) / prob.yy)
        removed.append((~mask).astype(float))
    return np.array(values), np.array(removed)


@pytest.mark.parametrize("case", [0, 2, 6])  # positive definite H (the removal view needs M = H^{-1})
def test_removal_shor_is_valid_and_its_cut_holds_everywhere(case):
    C, g, k, N, ridge = CASES[case]
    prob = _problem(np.random.default_rng(case), C, g, N, ridge)
    H, B = _normalised(prob)
    values, removed = _subset_errors(prob, k)
    sdp, V = removal_shor(H, B, 1.0, g, k)
    assert sdp.value <= values.min() + 1e-5
    assert np.isclose(sdp.z.sum(), k, atol=1e-4)
    rng = np.random.default_rng(case)
    for cut_V in (V, rng.normal(size=V.shape), np.zeros_like(V)):  # the cut holds for any V
        fA, a, Q = removal_cut(H, B, g, cut_V)
        cut = 1.0 + fA + removed @ a - np.einsum("ic,cd,id->i", removed, Q, removed)
        assert np.all(cut <= values + 1e-9)
    # the SDP's own V: the cut's smallest value over all removal sets is at least the SDP value (minimax)
    fA, a, Q = removal_cut(H, B, g, V)
    cut = 1.0 + fA + removed @ a - np.einsum("ic,cd,id->i", removed, Q, removed)
    assert cut.min() >= sdp.value - 1e-4


def test_removal_shor_is_tight_on_orthogonal_channels():
    """Orthonormal channels: removal costs add up, and the relaxation reaches the optimum."""
    rng = np.random.default_rng(4)
    X = np.linalg.qr(rng.normal(size=(40, 6)))[0] * 3.0
    Y = X @ rng.normal(size=(6, 2))
    prob = LayerProblem.from_arrays(X, Y, group_size=1)
    optimum = brute_force(prob, 3)[0] / prob.yy
    H, B = _normalised(prob)
    assert removal_shor(H, B, 1.0, 1, 3)[0].value == pytest.approx(optimum, abs=1e-5)
