"""Partition pruning: the MILP and the enumeration against brute force over all balanced partitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from orprune import LayerProblem, Partition, partition_layer, partition_weights
from orprune._status import FEASIBLE, OPTIMAL, TIME_LIMIT
from orprune.layer._partition_milp import balanced_assignment
from orprune.layer.partition_data import balanced_partitions, partition_refit


def balanced(n_items: int, P: int):
    """Every labelling of ``n_items`` with parts 0..P-1 whose sizes are floor or ceil of n_items / P."""
    lo, hi = n_items // P, -(-n_items // P)
    for labels in itertools.product(range(P), repeat=n_items):
        counts = np.bincount(labels, minlength=P)
        if np.all((counts >= lo) & (counts <= hi)):
            yield np.array(labels)


def brute_energy(W: np.ndarray, P: int) -> float:
    """Minimum over every pair of balanced labellings (the outputs' labellings at once, as an array)."""
    E = W**2
    outputs = np.array(list(balanced(W.shape[1], P)))
    best = math.inf
    for a in balanced(W.shape[0], P):
        kept_by_part = E.T @ np.eye(P)[a]  # (outputs, P): energy output j keeps in part p
        kept = kept_by_part[np.arange(W.shape[1]), outputs].sum(axis=1)
        best = min(best, float(E.sum() - kept.max()))
    return best


def reconstruction(X, Y, ridge, parts_in, parts_out) -> float:
    """The error from the data: each output refit by ridge least squares over its part's inputs."""
    total = 0.0
    for j in range(Y.shape[1]):
        cols = np.flatnonzero(parts_in == parts_out[j])
        A = np.vstack([X[:, cols], math.sqrt(ridge) * np.eye(cols.size)])
        w = np.linalg.lstsq(A, np.r_[Y[:, j], np.zeros(cols.size)], rcond=None)[0]
        total += float(np.sum((Y[:, j] - X[:, cols] @ w) ** 2) + ridge * np.sum(w**2))
    return total


@pytest.mark.parametrize("d, q, P, seed", [(4, 4, 2, 0), (5, 4, 2, 1), (6, 5, 3, 2), (6, 6, 2, 3), (7, 5, 3, 4),
                                           (6, 6, 3, 5)])
def test_energy_milp_equals_brute_force(d, q, P, seed):
    W = np.random.default_rng(seed).normal(size=(d, q))
    W[W**2 < 0.05] = 0.0  # zero weights get no product variable
    best = brute_energy(W, P)
    exact = partition_weights(W, P, solver="exact")
    assert isinstance(exact, Partition) and exact.status == OPTIMAL and exact.criterion == "energy"
    assert exact.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert exact.bound == pytest.approx(best, rel=1e-6, abs=1e-9)
    heuristic = partition_weights(W, P, solver="heuristic")
    assert heuristic.status == FEASIBLE
    assert heuristic.bound <= best + 1e-9 <= heuristic.objective + 2e-9
    for result in (exact, heuristic):
        for parts, n in ((result.input_parts, d), (result.output_parts, q)):
            counts = np.bincount(parts, minlength=P)
            assert counts.size == P and counts.min() >= n // P and counts.max() <= -(-n // P)
        np.testing.assert_array_equal(result.weights, np.where(result.mask, W, 0.0))
        assert result.objective == pytest.approx(float(np.sum(W[~result.mask] ** 2)), rel=1e-12)


def test_one_part_keeps_everything_and_time_limit_keeps_a_valid_bound():
    W = np.random.default_rng(0).normal(size=(6, 4))
    one = partition_weights(W, 1)
    assert one.objective == 0 and one.mask.all() and one.status == OPTIMAL
    W = np.random.default_rng(1).normal(size=(40, 24))
    limited = partition_weights(W, 4, solver="exact", time_limit=0.2)
    assert limited.status in (TIME_LIMIT, OPTIMAL) and 0 <= limited.bound <= limited.objective
    assert limited.bound > 0  # at least the capacity bound


def test_heuristic_recovers_a_planted_block_structure():
    rng = np.random.default_rng(3)
    parts_in, parts_out = rng.permutation(np.arange(48) % 4), rng.permutation(np.arange(32) % 4)
    W = np.where(parts_in[:, None] == parts_out[None, :], rng.normal(size=(48, 32)), 0.01 * rng.normal(size=(48, 32)))
    result = partition_weights(W, 4, solver="heuristic")
    assert result.objective == pytest.approx(float(np.sum(W[parts_in[:, None] != parts_out[None, :]] ** 2)))


@pytest.mark.parametrize("lo, hi", [(2, 2), (2, 3), (1, 2)])
def test_balanced_assignment_equals_brute_force(lo, hi):
    rng = np.random.default_rng(lo + hi)
    n, P = (6, 3) if lo == hi else (7, 3) if hi == 3 else (5, 3)
    score = rng.normal(size=(n, P))
    best = max(score[np.arange(n), a].sum() for a in balanced(n, P))
    parts = balanced_assignment(score, n // P, -(-n // P))
    assert score[np.arange(n), parts].sum() == pytest.approx(best)
    counts = np.bincount(parts, minlength=P)
    assert counts.min() >= n // P and counts.max() <= -(-n // P)


@pytest.mark.parametrize("n, P", [(6, 2), (7, 3), (8, 4), (5, 5)])
def test_balanced_partitions_lists_each_partition_once(n, P):
    listed = list(balanced_partitions(n, P))
    assert len(listed) * math.factorial(P) == sum(1 for _ in balanced(n, P))
    canonical = {tuple(labels) for labels in listed}
    assert len(canonical) == len(listed)


@pytest.mark.parametrize("ridge", [0.0, 0.2])
def test_reconstruction_exact_equals_brute_force(ridge):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(40, 6)) + 0.5 * rng.normal(size=(40, 1))
    Y = X @ rng.normal(size=(6, 4)) + 0.1 * rng.normal(size=(40, 4))
    prob = LayerProblem.from_arrays(X, Y, ridge=ridge)
    best = min(reconstruction(X, Y, ridge, a, b) for a in balanced(6, 2) for b in balanced(4, 2))
    exact = partition_layer(prob, 2, solver="exact")
    assert exact.status == OPTIMAL and exact.criterion == "reconstruction"
    assert exact.objective == pytest.approx(best, rel=1e-9)
    alternate = partition_layer(prob, 2)
    assert alternate.status == FEASIBLE and alternate.objective >= best - 1e-9
    assert alternate.bound <= best
    for result in (exact, alternate):
        assert np.all(result.weights[~result.mask] == 0)
        recomputed = np.sum((Y - X @ result.weights) ** 2) + ridge * np.sum(result.weights**2)
        assert result.objective == pytest.approx(recomputed, rel=1e-9)
        assert result.objective == pytest.approx(
            reconstruction(X, Y, ridge, result.input_parts, result.output_parts), rel=1e-9)


def test_partition_refit_of_one_part_is_the_full_refit():
    rng = np.random.default_rng(2)
    prob = LayerProblem.from_arrays(rng.normal(size=(30, 5)), rng.normal(size=(30, 3)), ridge=0.1)
    weights, value = partition_refit(prob, np.zeros(5, int), np.zeros(3, int))
    assert value == pytest.approx(prob.full_objective)
    np.testing.assert_allclose(weights, prob.full_weights, atol=1e-10)


@pytest.mark.parametrize("call, match", [
    (lambda W, prob: partition_weights(W, 0), "`n_parts`"),
    (lambda W, prob: partition_weights(W, 5), "`n_parts`"),
    (lambda W, prob: partition_weights(W, 2, solver="scip"), "`solver`"),
    (lambda W, prob: partition_weights(W, 2, time_limit=0), "`time_limit`"),
    (lambda W, prob: partition_weights(np.ones(3), 2), "`weights`"),
    (lambda W, prob: partition_layer(W, 2), "`prob` must be a LayerProblem"),
    (lambda W, prob: partition_layer(prob, 2, solver="greedy"), "`solver`"),
    (lambda W, prob: partition_layer(prob, 2, solver="exact", max_partitions=3), "`max_partitions`"),
])
def test_bad_inputs(call, match):
    rng = np.random.default_rng(0)
    prob = LayerProblem.from_arrays(rng.normal(size=(20, 6)), rng.normal(size=(20, 4)))
    with pytest.raises(ValueError, match=match):
        call(rng.normal(size=(6, 4)), prob)
