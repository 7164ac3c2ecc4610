from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import pytest
import scipy.linalg

import orprune
from orprune.layer.problem import LayerProblem
from orprune.layer.solvers.perspective import perspective_relaxation, relaxation_value, separable_part


def make_problem(seed: int, C: int = 6, g: int = 2, n_out: int = 3, ridge: float = 0.05, N: int = 40) -> LayerProblem:
    """Correlated channels (a shared factor) and noisy targets, as in real layers."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, C * g)) + rng.normal(size=(N, 1)) * rng.uniform(0.2, 1.5)
    Y = X @ rng.normal(size=(C * g, n_out)) + 0.5 * rng.normal(size=(N, n_out))
    return LayerProblem.from_arrays(X, Y, group_size=g, ridge=ridge)


def brute_force(prob: LayerProblem, k: int) -> tuple[float, np.ndarray]:
    best = min(itertools.combinations(range(prob.n_channels), k), key=lambda S: prob.objective(np.array(S)))
    mask = np.zeros(prob.n_channels, dtype=bool)
    mask[list(best)] = True
    return prob.objective(mask), mask


def independent_relaxation(prob: LayerProblem, k: int, D: np.ndarray) -> float:
    """The same relaxation written differently: explicit rotated cones per (channel, output)
    pair, and the coupled part through a factor F of H - D (sum_squares)."""
    C, g = prob.n_channels, prob.group_size
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    values, vectors = np.linalg.eigh(H - scipy.linalg.block_diag(*D))
    F = vectors * np.sqrt(np.clip(values, 0, None))
    roots = [scipy.linalg.sqrtm(D[c]).real for c in range(C)]
    W = cp.Variable(prob.cross.shape)
    z = cp.Variable(C)
    t = cp.Variable((C, prob.n_outputs))
    constraints = [z >= 0, z <= 1, cp.sum(z) == k]
    for c in range(C):
        for o in range(prob.n_outputs):
            x = roots[c] @ W[c * g : (c + 1) * g, o]
            # ||x||^2 <= t z  <=>  ||(2x, t - z)|| <= t + z
            constraints.append(cp.SOC(t[c, o] + z[c], cp.hstack([2 * x, t[c, o] - z[c]])))
    s = 1.0 / prob.yy
    objective = s * (prob.yy - 2 * cp.sum(cp.multiply(prob.cross, W)) + cp.sum_squares(F.T @ W) + cp.sum(t))
    problem = cp.Problem(cp.Minimize(objective), constraints)
    problem.solve(solver="CLARABEL")
    assert problem.status == "optimal"
    return problem.value * prob.yy


@pytest.mark.parametrize("seed", range(12))
def test_bound_below_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    C = int(rng.integers(4, 11))
    g = int(rng.integers(1, 4))
    prob = make_problem(seed, C=C, g=g, n_out=int(rng.integers(1, 4)), ridge=float(rng.choice([1e-3, 0.1, 2.0])))
    k = int(rng.integers(1, C))
    optimum, _ = brute_force(prob, k)
    for method in ("first_order", "socp"):
        for separable in ("uniform", "block", "precision"):
            relaxation = perspective_relaxation(prob, k, method=method, separable=separable)
            assert relaxation.bound <= optimum * (1 + 1e-9)
            assert relaxation.bound <= relaxation.value * (1 + 1e-9)
            assert np.all(relaxation.z >= -1e-9) and np.all(relaxation.z <= 1 + 1e-9)
    selection = orprune.select(prob, k, solver="perspective")
    assert selection.k == k
    assert selection.bound <= optimum * (1 + 1e-9) <= selection.objective * (1 + 1e-9)


@pytest.mark.parametrize("separable", ["uniform", "block", "precision"])
def test_value_matches_independent_cvxpy(separable):
    prob = make_problem(3, C=5, g=2, n_out=2)
    k = 2
    D = separable_part(prob, separable)
    reference = independent_relaxation(prob, k, D)
    for method in ("first_order", "socp"):
        relaxation = perspective_relaxation(prob, k, method=method, separable=separable, rtol=1e-8)
        np.testing.assert_allclose(relaxation.value, reference, rtol=1e-5)
        np.testing.assert_allclose(relaxation.bound, reference, rtol=1e-4)


def test_relaxation_is_exact_at_binary_points():
    prob = make_problem(5, C=6, g=3, n_out=2)
    for S in [(0, 1), (2, 4, 5), (1,)]:
        mask = np.zeros(6)
        mask[list(S)] = 1.0
        for separable in ("uniform", "block", "precision"):
            np.testing.assert_allclose(relaxation_value(prob, mask, separable), prob.objective(list(S)), rtol=1e-8)


@pytest.mark.parametrize("kind", ["uniform", "block", "sdp"])
def test_separable_part_is_valid(kind):
    prob = make_problem(7, C=5, g=2)
    D = separable_part(prob, kind)
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    assert D.shape == (5, 2, 2)
    assert np.linalg.eigvalsh(D).min() >= -1e-10 * np.trace(H)
    assert np.linalg.eigvalsh(H - scipy.linalg.block_diag(*D)).min() >= -1e-9 * np.trace(H)
    assert np.trace(D, axis1=1, axis2=2).sum() > 0


def test_sdp_split_captures_most_trace():
    prob = make_problem(8, C=4, g=2)
    trace = {kind: np.trace(separable_part(prob, kind), axis1=1, axis2=2).sum() for kind in ("uniform", "sdp")}
    assert trace["sdp"] >= trace["uniform"] * (1 - 1e-6)  # the SDP maximises the trace


def test_tight_relaxation_is_certified_optimal():
    # Orthogonal channels with equal scale: H = a I, the perspective takes the whole quadratic,
    # the relaxation is linear in z and its optimum is integral.
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(50, 12)))
    X = 3.0 * Q
    Y = X @ rng.normal(size=(12, 2))
    prob = LayerProblem.from_arrays(X, Y, group_size=3, ridge=0.1)
    optimum, best = brute_force(prob, 2)
    selection = orprune.select(prob, 2, solver="perspective", polish=False)
    assert selection.status == orprune.OPTIMAL
    np.testing.assert_array_equal(selection.mask, best)
    np.testing.assert_allclose(selection.bound, optimum, rtol=1e-6)


def test_time_limit_keeps_bound_valid():
    prob = make_problem(9, C=9, g=2)
    optimum, _ = brute_force(prob, 4)
    relaxation = perspective_relaxation(prob, 4, method="first_order", time_limit=1e-6)
    assert relaxation.backend_status == "time_limit"
    assert relaxation.bound <= optimum


def test_info_and_polish():
    prob = make_problem(10, C=8, g=2)
    selection = orprune.select(prob, 3, solver="perspective")
    info = selection.info
    assert selection.status in (orprune.FEASIBLE, orprune.OPTIMAL)
    assert info["z"].shape == (8,) and abs(info["z"].sum() - 3) < 1e-6
    assert info["relaxation_bound"] <= info["relaxation_value"] * (1 + 1e-9)
    assert selection.objective <= info["rounded_objective"] * (1 + 1e-12)  # polishing never hurts


def test_bad_options():
    prob = make_problem(11, C=4)
    with pytest.raises(ValueError, match="`method`"):
        orprune.select(prob, 2, solver="perspective", method="newton")
    with pytest.raises(ValueError, match="`separable`"):
        orprune.select(prob, 2, solver="perspective", separable="diagonal")
    with pytest.raises(ValueError, match="`separable`"):
        orprune.select(prob, 2, solver="perspective", separable=np.eye(3))


@pytest.mark.parametrize("solver", orprune.available_solvers())
def test_every_solver_objective_matches_its_mask(solver):
    prob = make_problem(12, C=7, g=2, n_out=2)
    prob_with_weights = LayerProblem(prob.gram, prob.cross, prob.yy, group_size=2, ridge=prob.ridge,
                                     weights=prob.full_weights + 0.01)
    for p in (prob, prob_with_weights):
        for k in (1, 3, 6):
            selection = orprune.select(p, k, solver=solver, time_limit=30)
            assert selection.k == k
            assert selection.objective == pytest.approx(p.objective(selection.mask), rel=1e-10, abs=1e-12)
            assert selection.bound <= selection.objective
