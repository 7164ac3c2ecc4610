"""N:M selection: brute force per output column, the N:M structure, and the objective recomputed from the data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from orprune import LayerProblem, NMSelection, select_nm
from orprune._status import FEASIBLE, OPTIMAL, TIME_LIMIT
from orprune.layer.nm import nm_refit
from tests.layer.instances import random_arrays


def data(seed: int, n_inputs: int, n_outputs: int = 3, correlated: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return random_arrays(rng, n_inputs, 1, 4 * n_inputs, n_outputs, correlated)


def column_error(X: np.ndarray, y: np.ndarray, cols: np.ndarray, ridge: float) -> float:
    """``min_w ||y - X_S w||^2 + r ||w||^2`` from the data (ridge as extra rows of an ordinary least squares)."""
    A = np.vstack([X[:, cols], np.sqrt(ridge) * np.eye(cols.size)])
    t = np.concatenate([y, np.zeros(cols.size)])
    w = np.linalg.lstsq(A, t, rcond=None)[0]
    return float(np.sum((y - X[:, cols] @ w) ** 2) + ridge * np.sum(w**2))


def nm_sets(n_inputs: int, n: int, m: int):
    """Every kept set with exactly ``n`` of each ``m`` consecutive inputs."""
    per_block = [list(itertools.combinations(range(b * m, (b + 1) * m), n)) for b in range(n_inputs // m)]
    for parts in itertools.product(*per_block):
        yield np.array(sorted(itertools.chain(*parts)))


def brute_force_columns(X, Y, n, m, ridge) -> np.ndarray:
    return np.array([min(column_error(X, Y[:, j], s, ridge) for s in nm_sets(X.shape[1], n, m))
                     for j in range(Y.shape[1])])


def assert_nm(mask: np.ndarray, n: int, m: int) -> None:
    counts = mask.reshape(-1, m, mask.shape[1]).sum(axis=1)
    assert np.all(counts == n)


@pytest.mark.parametrize("n_inputs, n, m, ridge, seed", [
    (8, 2, 4, 0.0, 0), (12, 2, 4, 0.5, 1), (12, 1, 4, 0.0, 2), (12, 2, 6, 0.1, 3), (9, 1, 3, 0.0, 4),
    (12, 3, 4, 0.0, 5),
])
def test_exact_equals_brute_force_per_output_column(n_inputs, n, m, ridge, seed):
    X, Y = data(seed, n_inputs)
    prob = LayerProblem.from_arrays(X, Y, ridge=ridge)
    result = select_nm(prob, n, m, solver="exact")
    assert isinstance(result, NMSelection) and result.status == OPTIMAL and result.success
    best = brute_force_columns(X, Y, n, m, ridge)
    achieved = [column_error(X, Y[:, j], np.flatnonzero(result.mask[:, j]), ridge) for j in range(Y.shape[1])]
    np.testing.assert_allclose(achieved, best, rtol=1e-8, atol=1e-8)  # each column optimal, not just the sum
    assert result.objective == pytest.approx(best.sum(), rel=1e-8)
    assert result.bound == pytest.approx(best.sum(), rel=1e-7) and result.gap < 1e-7


@pytest.mark.parametrize("solver", ["exact", "greedy", "magnitude"])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_structure_weights_and_objective_from_the_data(solver, ridge):
    X, Y = data(7, 16, n_outputs=4)
    prob = LayerProblem.from_arrays(X, Y, ridge=ridge, weights=np.random.default_rng(0).normal(size=(16, 4)))
    result = select_nm(prob, 2, 4, solver=solver)
    assert result.mask.shape == (16, 4) and result.mask.dtype == bool
    assert_nm(result.mask, 2, 4)
    assert np.all(result.weights[~result.mask] == 0)
    residual = Y - X @ result.weights
    recomputed = np.sum(residual**2) + ridge * np.sum(result.weights**2)
    assert result.objective == pytest.approx(recomputed, rel=1e-9)
    # the refit weights are each column's least squares over its kept inputs
    per_column = [column_error(X, Y[:, j], np.flatnonzero(result.mask[:, j]), ridge) for j in range(4)]
    assert result.objective == pytest.approx(sum(per_column), rel=1e-9)
    assert result.bound <= result.objective + 1e-9
    assert result.status == (OPTIMAL if solver == "exact" else FEASIBLE)
    with pytest.raises(ValueError):
        result.mask[0, 0] = True  # frozen


def test_greedy_is_a_block_coordinate_optimum_and_exact_is_no_worse():
    X, Y = data(11, 16, n_outputs=3)
    prob = LayerProblem.from_arrays(X, Y, ridge=0.01)
    greedy = select_nm(prob, 2, 4, solver="greedy")
    exact = select_nm(prob, 2, 4, solver="exact")
    assert exact.objective <= greedy.objective + 1e-9
    for j in range(3):
        kept = np.flatnonzero(greedy.mask[:, j])
        value = column_error(X, Y[:, j], kept, 0.01)
        for b in range(4):  # no single block's pattern change lowers the column's error
            others = kept[(kept < 4 * b) | (kept >= 4 * b + 4)]
            for pattern in itertools.combinations(range(4 * b, 4 * b + 4), 2):
                assert column_error(X, Y[:, j], np.sort(np.r_[others, pattern]), 0.01) >= value - 1e-8


def test_magnitude_keeps_the_largest_weights_of_each_block():
    X, Y = data(3, 8, n_outputs=2)
    W = np.random.default_rng(5).normal(size=(8, 2))
    result = select_nm(LayerProblem.from_arrays(X, Y, weights=W), 1, 4, solver="magnitude")
    expected = np.zeros_like(result.mask)
    for b in range(2):
        for j in range(2):
            expected[4 * b + np.argmax(np.abs(W[4 * b:4 * b + 4, j])), j] = True
    np.testing.assert_array_equal(result.mask, expected)


def test_time_limit_returns_a_valid_mask_and_bound():
    X, Y = data(2, 16, n_outputs=2)
    prob = LayerProblem.from_arrays(X, Y)
    result = select_nm(prob, 2, 4, time_limit=1e-9)
    assert result.status == TIME_LIMIT and result.success
    assert_nm(result.mask, 2, 4)
    optimum = select_nm(prob, 2, 4).objective
    assert result.bound <= optimum + 1e-9 <= result.objective + 2e-9


def test_n_equal_m_keeps_everything():
    X, Y = data(4, 8)
    prob = LayerProblem.from_arrays(X, Y)
    result = select_nm(prob, 4, 4)
    assert result.mask.all() and result.objective == pytest.approx(prob.full_objective)


def test_nm_refit_matches_layer_problem_when_every_column_keeps_the_same_inputs():
    X, Y = data(6, 8)
    prob = LayerProblem.from_arrays(X, Y, ridge=0.2)
    channels = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    weights, value = nm_refit(prob, np.repeat(channels[:, None], 3, axis=1))
    expected_w, expected = prob.refit(channels)
    assert value == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(weights, expected_w, atol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 3, "m": 2}, "`n`"),
    ({"n": 2, "m": 3}, "`m` must divide"),
    ({"m": 0}, "`m`"),
    ({"solver": "scip"}, "`solver`"),
    ({"time_limit": -1.0}, "`time_limit`"),
    ({"max_sweeps": 0}, "`max_sweeps`"),
])
def test_bad_inputs(kwargs, match):
    X, Y = data(0, 8)
    with pytest.raises(ValueError, match=match):
        select_nm(LayerProblem.from_arrays(X, Y), **kwargs)


def test_bad_problems():
    X, Y = data(0, 8)
    with pytest.raises(ValueError, match="`prob` must have group_size 1"):
        select_nm(LayerProblem.from_arrays(X, Y, group_size=2))
    with pytest.raises(ValueError, match="`prob` must be a LayerProblem"):
        select_nm(X)
    with pytest.raises(ValueError, match="`mask` must have shape"):
        nm_refit(LayerProblem.from_arrays(X, Y), np.ones((8, 2), dtype=bool))
