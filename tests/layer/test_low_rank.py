"""The closed-form rank-r map against numerical minimisation, random maps and its own curve."""

import numpy as np
import pytest
import scipy.optimize

from orprune import LayerProblem, map_objective, rank_curve, select_rank
from tests.layer.instances import random_arrays, random_problem

CASES = [  # (seed, channels, group size, outputs, ridge, samples)
    (0, 4, 1, 5, 0.0, None),
    (1, 3, 4, 6, 0.7, None),  # a strong ridge: the objective includes it exactly
    (2, 5, 2, 4, 0.05, None),
    (3, 6, 2, 5, 0.0, 7),  # N = 7 < 12 features: G singular, no ridge
]


def problem(seed, channels, group, outputs, ridge, samples):
    return random_problem(seed, channels, group, n_outputs=outputs, ridge=ridge, n_samples=samples, correlated=True)


def direct_objective(X, Y, W, ridge):
    """``||Y - X W||^2 + ridge ||W||^2`` from the data itself."""
    return float(np.sum((Y - X @ W) ** 2) + ridge * np.sum(W**2))


def als(prob, rank, rng, iterations=100):
    """Alternating least squares over W = L R from a random start (each step an exact minimisation)."""
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    pinv = np.linalg.pinv(H, rcond=1e-12, hermitian=True)
    R = rng.normal(size=(rank, prob.n_outputs))
    for _ in range(iterations):
        L = pinv @ prob.cross @ R.T @ np.linalg.pinv(R @ R.T)
        R = np.linalg.pinv(L.T @ H @ L) @ L.T @ prob.cross
    return map_objective(prob, L @ R)


def lbfgs(prob, rank, rng):
    """scipy's L-BFGS over the two factors from a random start (a non-convex problem)."""
    n, m = prob.n_features, prob.n_outputs
    H = prob.gram + prob.ridge * np.eye(n)

    def fun(z):
        L, R = z[: n * rank].reshape(n, rank), z[n * rank :].reshape(rank, m)
        W = L @ R
        grad_w = 2 * (H @ W - prob.cross)
        value = prob.yy - 2 * np.sum(W * prob.cross) + np.sum(W * (H @ W))
        return value, np.concatenate([(grad_w @ R.T).ravel(), (L.T @ grad_w).ravel()])

    z0 = rng.normal(size=n * rank + rank * m)
    res = scipy.optimize.minimize(fun, z0, jac=True, method="L-BFGS-B", options={"maxiter": 300})
    z = res.x
    return map_objective(prob, z[: n * rank].reshape(n, rank) @ z[n * rank :].reshape(rank, m))


@pytest.mark.parametrize("case", CASES)
def test_curve_equals_the_objective_of_the_returned_maps(case):
    prob = problem(*case)
    curve = rank_curve(prob)
    assert curve.ranks.tolist() == list(range(min(prob.n_features, prob.n_outputs) + 1))
    assert np.all(np.diff(curve.errors) <= 1e-12 * prob.yy)  # non-increasing
    assert curve.errors[0] == pytest.approx(prob.yy, rel=1e-10)
    assert curve.errors[-1] == pytest.approx(prob.full_objective, rel=1e-8, abs=1e-10 * prob.yy)
    for r in curve.ranks:
        sel = select_rank(prob, int(r))
        assert sel.status == "optimal" and sel.success and sel.rank == r
        assert sel.left.shape == (prob.n_features, r) and sel.right.shape == (r, prob.n_outputs)
        assert np.linalg.matrix_rank(sel.weights) <= r
        assert sel.objective == pytest.approx(map_objective(prob, sel.weights), rel=1e-12)
        assert sel.objective == pytest.approx(curve.errors[r], rel=1e-8, abs=1e-10 * prob.yy)
        assert sel.gap <= 1e-6 and sel.objective - sel.bound <= 1e-12 * prob.yy


@pytest.mark.parametrize("ridge", [0.0, 0.7])
def test_map_objective_is_the_data_objective_including_the_ridge(ridge):
    rng = np.random.default_rng(4)
    X, Y = random_arrays(rng, 4, 3, 30, n_outputs=5)
    prob = LayerProblem.from_arrays(X, Y, group_size=3, ridge=ridge)
    for r in range(4):
        sel = select_rank(prob, r)
        assert sel.objective == pytest.approx(direct_objective(X, Y, sel.weights, ridge), rel=1e-9)
    W = rng.normal(size=(12, 5))
    assert map_objective(prob, W) == pytest.approx(direct_objective(X, Y, W, ridge), rel=1e-9)
    # full rank: the unconstrained refit of LayerProblem
    full = select_rank(prob, 5)
    np.testing.assert_allclose(full.weights, prob.full_weights, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_no_numerical_minimisation_or_random_map_beats_the_closed_form(case):
    prob = problem(*case)
    rng = np.random.default_rng(10 + case[0])
    tol = 1e-9 * prob.yy
    for r in range(1, min(prob.n_features, prob.n_outputs)):
        best = select_rank(prob, r).objective
        found = [als(prob, r, rng) for _ in range(6)]
        assert min(found) >= best - tol
        assert lbfgs(prob, r, rng) >= best - tol
        # and alternating least squares does reach it (no spurious local minima): the bound is tight
        assert min(found) == pytest.approx(best, rel=1e-6, abs=1e-8 * prob.yy)
        for _ in range(50):  # random rank-r maps, and random perturbations of the optimum within rank r
            W = rng.normal(size=(prob.n_features, r)) @ rng.normal(size=(r, prob.n_outputs))
            assert map_objective(prob, W * rng.uniform(0.01, 2)) >= best - tol
            sel = select_rank(prob, r)
            L = sel.left + 1e-3 * rng.normal(size=sel.left.shape)
            R = sel.right + 1e-3 * rng.normal(size=sel.right.shape)
            assert map_objective(prob, L @ R) >= best - tol


def test_factors_are_whitened_and_the_energy_rank():
    prob = problem(*CASES[2])
    sel = select_rank(prob, 3)
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    np.testing.assert_allclose(sel.left.T @ H @ sel.left, np.eye(3), atol=1e-9)
    curve = rank_curve(prob)
    power = curve.singular_values**2
    for energy in (0.0, 0.5, 0.9, 0.99, 1.0):
        r = curve.energy_rank(energy)
        assert power[:r].sum() >= energy * power.sum() - 1e-9
        assert r == 0 or power[: r - 1].sum() < energy * power.sum()
    np.testing.assert_allclose(np.sort(sel.singular_values)[::-1], curve.singular_values[: sel.singular_values.size])


def test_rank_beyond_the_numerical_rank_pads_with_zeros():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 6))
    Y = X @ rng.normal(size=(6, 1)) @ rng.normal(size=(1, 4))  # the exact map has rank 1
    prob = LayerProblem.from_arrays(X, Y)
    curve = rank_curve(prob)
    assert curve.errors[1] == pytest.approx(0.0, abs=1e-9 * prob.yy)
    sel = select_rank(prob, 3)
    assert sel.left.shape == (6, 3) and sel.objective == pytest.approx(0.0, abs=1e-9 * prob.yy)


def test_bad_inputs():
    prob = problem(*CASES[0])
    with pytest.raises(ValueError, match="`rank` must lie in"):
        select_rank(prob, 6)
    with pytest.raises(ValueError, match="`rank` must lie in"):
        select_rank(prob, -1)
    with pytest.raises(ValueError, match="`rank` must be an integer"):
        select_rank(prob, 1.5)
    with pytest.raises(ValueError, match="`prob` must be a LayerProblem"):
        rank_curve("layer")
    with pytest.raises(ValueError, match="`weights` must have shape"):
        map_objective(prob, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="`energy` must lie in"):
        rank_curve(prob).energy_rank(1.5)
