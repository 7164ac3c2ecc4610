"""Coarse-to-fine (group, then entry) selection against brute force over every feasible mask."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from orprune import HierarchicalSelection, LayerProblem, select_hierarchical
from orprune._status import FEASIBLE, OPTIMAL
from orprune.layer.hierarchical import allocate_entries
from tests.layer.instances import random_arrays


def column_error(X, y, cols, ridge) -> float:
    A = np.vstack([X[:, cols], np.sqrt(ridge) * np.eye(cols.size)])
    w = np.linalg.lstsq(A, np.r_[y, np.zeros(cols.size)], rcond=None)[0]
    return float(np.sum((y - X[:, cols] @ w) ** 2) + ridge * np.sum(w**2))


def brute_force(X, Y, g, k, K, ridge) -> float:
    """Every k groups, every kept subset per output column with at most K entries in total."""
    C = X.shape[1] // g
    best = np.inf
    for groups in itertools.combinations(range(C), k):
        features = [c * g + t for c in groups for t in range(g)]
        subsets = [np.array(s, int) for r in range(len(features) + 1) for s in itertools.combinations(features, r)]
        errors = np.array([[column_error(X, Y[:, j], s, ridge) for s in subsets] for j in range(Y.shape[1])])
        sizes = np.array([s.size for s in subsets])
        for pick in itertools.product(range(len(subsets)), repeat=Y.shape[1]):
            if sizes[list(pick)].sum() <= K:
                best = min(best, float(errors[np.arange(Y.shape[1]), pick].sum()))
    return best


@pytest.mark.parametrize("C, g, k, K, ridge, seed", [
    (4, 1, 2, 3, 0.0, 0), (4, 1, 2, 1, 0.2, 1), (4, 1, 3, 5, 0.0, 2), (3, 2, 2, 5, 0.1, 3), (3, 2, 1, 2, 0.0, 4),
])
def test_exact_equals_brute_force(C, g, k, K, ridge, seed):
    X, Y = random_arrays(np.random.default_rng(seed), C, g, 30, n_outputs=2, correlated=True)
    prob = LayerProblem.from_arrays(X, Y, group_size=g, ridge=ridge)
    result = select_hierarchical(prob, k, K, solver="exact")
    assert isinstance(result, HierarchicalSelection) and result.status == OPTIMAL
    assert result.objective == pytest.approx(brute_force(X, Y, g, k, K, ridge), rel=1e-9)
    greedy = select_hierarchical(prob, k, K)
    assert greedy.status == FEASIBLE and greedy.objective >= result.objective - 1e-9
    for r in (result, greedy):
        assert r.groups.sum() == k and r.mask.sum() <= K
        rows = np.flatnonzero(r.mask.any(axis=1))
        assert set(rows // g) <= set(np.flatnonzero(r.groups))
        recomputed = np.sum((Y - X @ r.weights) ** 2) + ridge * np.sum(r.weights**2)
        assert r.objective == pytest.approx(recomputed, rel=1e-9)
        assert np.all(r.weights[~r.mask] == 0) and r.bound <= r.objective + 1e-9


def test_greedy_on_a_larger_layer_meets_the_budgets():
    X, Y = random_arrays(np.random.default_rng(5), 16, 2, 200, n_outputs=6, correlated=True)
    prob = LayerProblem.from_arrays(X, Y, group_size=2, ridge=0.01)
    result = select_hierarchical(prob, 8, 40)
    assert result.groups.sum() == 8 and result.mask.sum() == 40
    everything = select_hierarchical(prob, 16, 16 * 2 * 6)
    assert everything.objective == pytest.approx(prob.full_objective, rel=1e-9)


def test_allocate_entries_equals_brute_force():
    rng = np.random.default_rng(0)
    curves = [np.r_[0.0, np.cumsum(rng.random(n))] for n in (3, 2, 4)]
    for budget in range(0, 10):
        best = max(sum(c[s] for c, s in zip(curves, pick))
                   for pick in itertools.product(*(range(len(c)) for c in curves)) if sum(pick) <= budget)
        value, sizes = allocate_entries(curves, budget)
        assert value == pytest.approx(best) and sum(sizes) <= budget
        assert sum(c[s] for c, s in zip(curves, sizes)) == pytest.approx(best)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_groups": 5, "n_entries": 1}, "`n_groups`"),
    ({"n_groups": 1, "n_entries": 100}, "`n_entries`"),
    ({"n_groups": 1, "n_entries": 1, "solver": "scip"}, "`solver`"),
    ({"n_groups": 2, "n_entries": 1, "solver": "exact", "max_evaluations": 3}, "`max_evaluations`"),
])
def test_bad_inputs(kwargs, match):
    X, Y = random_arrays(np.random.default_rng(0), 4, 1, 20)
    with pytest.raises(ValueError, match=match):
        select_hierarchical(LayerProblem.from_arrays(X, Y), **kwargs)
    with pytest.raises(ValueError, match="`prob` must be a LayerProblem"):
        select_hierarchical(X, 1, 1)
