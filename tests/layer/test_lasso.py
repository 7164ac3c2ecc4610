from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest

import orprune
from orprune.layer.problem import LayerProblem
from orprune.layer.solvers.lasso import contribution_statistics, lasso_coordinate_descent, lasso_select


def make_arrays(seed: int, C: int = 8, g: int = 2, n_out: int = 3, N: int = 60):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, C * g)) + rng.normal(size=(N, 1))
    W = rng.normal(size=(C * g, n_out))
    Y = X @ W + 0.3 * rng.normal(size=(N, n_out))
    return X, Y, W


@pytest.mark.parametrize("seed", range(8))
def test_returns_exactly_k_and_lstsq_weights(seed):
    rng = np.random.default_rng(seed)
    C, g = int(rng.integers(4, 13)), int(rng.integers(1, 4))
    ridge = float(rng.choice([0.0, 0.5]))
    X, Y, W = make_arrays(seed, C=C, g=g)
    prob = LayerProblem.from_arrays(X, Y, group_size=g, ridge=ridge, weights=W if seed % 2 else None)
    for k in range(1, C):
        selection = orprune.select(prob, k, solver="lasso")
        assert selection.k == k
        cols = prob.columns(selection.mask)
        # ridge regression on the kept columns as an augmented least-squares problem
        A = np.vstack([X[:, cols], np.sqrt(ridge) * np.eye(cols.size)])
        b = np.vstack([Y, np.zeros((cols.size, Y.shape[1]))])
        reference = np.linalg.lstsq(A, b, rcond=None)[0]
        np.testing.assert_allclose(selection.weights[cols], reference, rtol=1e-7, atol=1e-9)
        dropped = np.setdiff1d(np.arange(prob.n_features), cols)
        assert np.all(selection.weights[dropped] == 0)
        assert selection.objective == pytest.approx(prob.objective(selection.mask), rel=1e-10)


def test_contribution_statistics_match_explicit_contributions():
    X, Y, W = make_arrays(1, C=5, g=3)
    prob = LayerProblem.from_arrays(X, Y, group_size=3, weights=W)
    Q, q = contribution_statistics(prob)
    Z = np.stack([(X[:, c * 3 : (c + 1) * 3] @ W[c * 3 : (c + 1) * 3]).ravel() for c in range(5)], axis=1)
    np.testing.assert_allclose(Q, Z.T @ Z, rtol=1e-10)
    np.testing.assert_allclose(q, Z.T @ Y.ravel(), rtol=1e-10)


@pytest.mark.parametrize("lam", [0.01, 0.3, 3.0])
def test_coordinate_descent_matches_cvxpy(lam):
    X, Y, W = make_arrays(2, C=7, g=2)
    prob = LayerProblem.from_arrays(X, Y, group_size=2, weights=W)
    Q, q = contribution_statistics(prob)
    Q, q = Q / prob.yy, q / prob.yy
    beta, _ = lasso_coordinate_descent(Q, q, lam)
    b = cp.Variable(7)
    L = np.linalg.cholesky(Q + 1e-12 * np.eye(7))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(L.T @ b) - 2 * q @ b + lam * cp.norm1(b)))
    problem.solve(solver="CLARABEL")

    def objective(x):
        return x @ Q @ x - 2 * q @ x + lam * np.abs(x).sum()

    assert objective(beta) <= problem.value + 1e-9
    np.testing.assert_allclose(beta, b.value, atol=1e-5)
    # exact zeros where the subgradient condition holds strictly
    slack = np.abs(q - Q @ beta)
    assert np.all(slack[beta == 0] <= lam / 2 + 1e-9)


def test_ties_fall_back_to_ranking_deterministically():
    # Channels 0 and 1 are identical: they enter the path together.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 4))
    X[:, 1] = X[:, 0]
    W = np.array([[1.0], [1.0], [0.2], [0.1]])
    Y = X @ W
    prob = LayerProblem.from_arrays(X, Y, group_size=1, ridge=1e-3, weights=W)
    first = lasso_select(prob, 1)
    second = lasso_select(prob, 1)
    assert first[0].sum() == 1
    np.testing.assert_array_equal(first[0], second[0])
    selection = orprune.select(prob, 1, solver="lasso")
    assert selection.k == 1


def test_keeps_the_channels_that_matter():
    # Four informative channels and four whose weights are nearly zero.
    rng = np.random.default_rng(4)
    X = rng.normal(size=(80, 8))
    W = np.array([[2.0], [-1.5], [1.0], [3.0], [0.01], [0.0], [-0.02], [0.0]])
    Y = X @ W
    prob = LayerProblem.from_arrays(X, Y, ridge=1e-6, weights=W)
    selection = orprune.select(prob, 4, solver="lasso")
    np.testing.assert_array_equal(selection.kept, [0, 1, 2, 3])
    assert selection.info["exact_count"]


def test_bad_weights():
    X, Y, W = make_arrays(5, C=4, g=2)
    prob = LayerProblem.from_arrays(X, Y, group_size=2)
    with pytest.raises(ValueError, match="`weights`"):
        orprune.select(prob, 2, solver="lasso", weights=np.ones((3, 3)))
