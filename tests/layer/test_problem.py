import numpy as np
import pytest
import torch

from orprune import LayerProblem, StatisticsAccumulator
from tests.layer.instances import random_arrays, random_problem


def lstsq_error(X, Y, cols, ridge):
    """Reference: ridge least squares through an augmented system solved by numpy."""
    A = X[:, cols]
    if ridge > 0:
        A = np.vstack([A, np.sqrt(ridge) * np.eye(len(cols))])
        Y = np.vstack([Y, np.zeros((len(cols), Y.shape[1]))])
    W = np.linalg.lstsq(A, Y, rcond=None)[0]
    return W, float(np.sum((Y - A @ W) ** 2))


@pytest.mark.parametrize("group_size", [1, 9])
@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_objective_and_refit_match_numpy_lstsq(group_size, ridge):
    rng = np.random.default_rng(group_size)
    C = 6
    X, Y = random_arrays(rng, C, group_size, 4 * C * group_size)
    prob = LayerProblem.from_arrays(X, Y, group_size=group_size, ridge=ridge)
    for _ in range(5):
        mask = rng.random(C) < 0.5
        cols = prob.columns(mask)
        W_ref, err_ref = lstsq_error(X, Y, cols, ridge)
        weights, value = prob.refit(mask)
        assert value == pytest.approx(err_ref, rel=1e-9, abs=1e-9 * prob.yy)
        assert prob.objective(mask) == pytest.approx(value, rel=1e-12)
        np.testing.assert_allclose(weights[cols], W_ref, rtol=1e-7, atol=1e-9)
        assert np.all(weights[np.setdiff1d(np.arange(prob.n_features), cols)] == 0)


def test_rank_deficient_without_ridge_matches_minimum_norm_lstsq():
    rng = np.random.default_rng(3)
    X, Y = random_arrays(rng, 8, 3, 10)  # N = 10 < 24 columns
    prob = LayerProblem.from_arrays(X, Y, group_size=3)
    mask = np.ones(8, dtype=bool)
    mask[:2] = False
    _, err_ref = lstsq_error(X, Y, prob.columns(mask), 0.0)
    assert prob.objective(mask) == pytest.approx(err_ref, abs=1e-8 * prob.yy)


def test_objective_is_monotone_and_full_objective_bounds_everything():
    prob = random_problem(0, 7, 2, ridge=0.1, correlated=True)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random(7) < 0.5
        bigger = mask | (rng.random(7) < 0.3)
        assert prob.objective(bigger) <= prob.objective(mask) + 1e-9 * prob.yy
        assert prob.full_objective <= prob.objective(mask) + 1e-9 * prob.yy
    assert prob.objective(np.zeros(7, dtype=bool)) == pytest.approx(prob.yy)


def test_from_statistics_agrees_with_from_arrays_and_batches():
    rng = np.random.default_rng(1)
    X, Y = random_arrays(rng, 5, 4, 80)
    from_arrays = LayerProblem.from_arrays(X, Y, group_size=4, ridge=0.2)
    acc = StatisticsAccumulator(20, Y.shape[1])
    for start in range(0, 80, 16):  # numpy and torch batches mixed
        batch = slice(start, start + 16)
        if start % 32:
            acc.update(torch.from_numpy(X[batch]).float(), torch.from_numpy(Y[batch]).float())
        else:
            acc.update(X[batch], Y[batch])
    gram, cross, yy = X.T @ X, X.T @ Y, float(np.sum(Y**2))
    from_stats = LayerProblem.from_statistics(gram, cross, yy, group_size=4, ridge=0.2)
    assert acc.n_samples == 80
    for mask in ([0, 1], [2, 3, 4], [1]):
        assert from_stats.objective(mask) == pytest.approx(from_arrays.objective(mask), rel=1e-10)
        # float32 batches: agreement to float32 precision
        assert acc.to_problem(group_size=4, ridge=0.2).objective(mask) == pytest.approx(
            from_arrays.objective(mask), rel=1e-4)


def test_centered_statistics_give_least_squares_with_intercept():
    rng = np.random.default_rng(2)
    X, Y = random_arrays(rng, 4, 2, 60)
    X, Y = X + 2.0, Y - 1.5
    acc = StatisticsAccumulator(8, Y.shape[1]).update(X, Y)
    prob = acc.to_problem(group_size=2, center=True)
    mean_x, mean_y = acc.means()
    mask = np.array([True, False, True, True])
    weights, value = prob.refit(mask)
    cols = prob.columns(mask)
    A = np.c_[X[:, cols], np.ones(len(X))]
    coef, residual = np.linalg.lstsq(A, Y, rcond=None)[:2]
    assert value == pytest.approx(residual.sum(), rel=1e-9)
    np.testing.assert_allclose(mean_y - mean_x @ weights, coef[-1], rtol=1e-8, atol=1e-10)


def test_combine_sums_objectives_of_problems_sharing_channels():
    p1 = random_problem(4, 5, 3, ridge=0.1)
    p2 = random_problem(5, 5, 1, ridge=0.3, n_outputs=2)
    combined = LayerProblem.combine([p1, p2], scales=[1.0, 2.0])
    assert combined.n_channels == 5 and combined.group_size == 4
    for mask in ([0], [1, 3], [0, 2, 4], []):
        expected = p1.objective(mask) + 2.0 * p2.objective(mask)
        assert combined.objective(mask) == pytest.approx(expected, rel=1e-10)


def test_problem_arrays_are_copies_and_read_only():
    rng = np.random.default_rng(0)
    X, Y = random_arrays(rng, 3, 2, 30)
    gram = X.T @ X
    prob = LayerProblem.from_statistics(gram, X.T @ Y, float(np.sum(Y**2)), group_size=2)
    gram[0, 0] = -1.0  # the caller's array is not aliased
    assert prob.gram[0, 0] > 0
    with pytest.raises(ValueError):
        prob.gram[0, 0] = 1.0


def _stats(seed=0):
    rng = np.random.default_rng(seed)
    X, Y = random_arrays(rng, 4, 2, 40)
    return X.T @ X, X.T @ Y, float(np.sum(Y**2))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda g, b, y: (g[:, :-1], b, y), "square"),
        (lambda g, b, y: (g, b[:-1], y), "one row per column"),
        (lambda g, b, y: (g + np.triu(np.ones_like(g), 1), b, y), "symmetric"),
        (lambda g, b, y: (g - 1e3 * np.eye(len(g)), b, y), "positive semidefinite"),
        (lambda g, b, y: (np.where(np.eye(len(g)) > 0, np.nan, g), b, y), "finite"),
        (lambda g, b, y: (g, np.full_like(b, np.inf), y), "finite"),
        (lambda g, b, y: (g, b, -1.0), "yy"),
        (lambda g, b, y: (g, b, 1e-3 * y), "inconsistent"),
    ],
)
def test_bad_statistics_raise(change, match):
    gram, cross, yy = change(*_stats())
    with pytest.raises(ValueError, match=match):
        LayerProblem.from_statistics(gram, cross, yy, group_size=2)


def test_bad_arrays_raise():
    rng = np.random.default_rng(0)
    X, Y = random_arrays(rng, 4, 2, 40)
    with pytest.raises(ValueError, match="group_size"):
        LayerProblem.from_arrays(X, Y, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        LayerProblem.from_arrays(X, Y, group_size=0)
    with pytest.raises(ValueError, match="same number of rows"):
        LayerProblem.from_arrays(X, Y[:-1])
    with pytest.raises(ValueError, match="ridge"):
        LayerProblem.from_arrays(X, Y, ridge=-1.0)
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        LayerProblem.from_arrays(X_nan, Y)
    prob = LayerProblem.from_arrays(X, Y, group_size=2)
    with pytest.raises(ValueError, match="shape"):
        prob.objective(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="indices"):
        prob.objective([0, 4])
    with pytest.raises(ValueError, match="repeat"):
        prob.objective([1, 1])
    with pytest.raises(ValueError, match="no samples"):
        StatisticsAccumulator(3, 1).to_problem()
    with pytest.raises(ValueError, match="finite"):
        StatisticsAccumulator(8, Y.shape[1]).update(X_nan, Y)


@pytest.mark.parametrize("smallest, accepted", [(0.0, True), (-1e-9, True), (-1e-4, False), (-0.5, False)])
def test_psd_check_follows_the_smallest_eigenvalue(smallest, accepted):
    """The Gram check accepts eigenvalues down to rounding (-1e-6 of the largest), no further:
    a rank-deficient Gram matrix is a Gram matrix, a clearly indefinite one is not."""
    from orprune._validation import check_psd

    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    eigenvalues = np.r_[smallest, np.linspace(0.1, 1.0, 11)]
    gram = (basis * eigenvalues) @ basis.T
    if accepted:
        np.testing.assert_allclose(check_psd(gram, "gram"), gram, atol=1e-12)
    else:
        with pytest.raises(ValueError, match="positive semidefinite"):
            check_psd(gram, "gram")


def test_centred_statistics_of_a_constant_column_are_exactly_zero():
    # a column constant over the data (a dead channel, a padded border) leaves only cancellation error in
    # its centred sums, of either sign; it must not break semidefiniteness (found by benchmarks/soak.py)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4))
    X[:, 2] = 0.1 + 1e-17  # constant
    Y = X @ rng.normal(size=(4, 3)) + 0.01 * rng.normal(size=(50, 3))
    acc = StatisticsAccumulator(4, 3).update(X[:17], Y[:17]).update(X[17:], Y[17:])
    gram, cross, _ = acc.statistics(center=True)
    assert np.all(gram[2] == 0) and np.all(gram[:, 2] == 0) and np.all(cross[2] == 0)
    Xc = X - X.mean(0)
    np.testing.assert_allclose(np.delete(np.delete(gram, 2, 0), 2, 1), np.delete(np.delete(Xc.T @ Xc, 2, 0), 2, 1),
                               rtol=1e-10)
    assert np.linalg.eigvalsh(gram)[0] >= 0
    acc.to_problem(center=True)  # passes the semidefiniteness check


def test_assume_psd_skips_only_the_psd_check():
    gram, cross, yy = _stats(3)
    checked = LayerProblem(gram, cross, yy, group_size=2, ridge=0.1)
    trusted = LayerProblem(gram, cross, yy, group_size=2, ridge=0.1, assume_psd=True)
    for mask in ([0], [1, 3], [0, 1, 2, 3]):
        assert trusted.objective(mask) == pytest.approx(checked.objective(mask), rel=1e-12)
    with pytest.raises(ValueError, match="inconsistent"):  # the consistency check still runs
        LayerProblem(gram, cross, 0.0, group_size=2, assume_psd=True)
