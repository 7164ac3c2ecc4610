"""The `swap` heuristic: greedy and backward elimination polished by 1-swap local search."""

from __future__ import annotations

import numpy as np
import pytest

from orprune import select
from tests.layer.instances import brute_force, random_problem


def _swaps(mask: np.ndarray):
    for i in np.flatnonzero(mask):
        for j in np.flatnonzero(~mask):
            trial = mask.copy()
            trial[i], trial[j] = False, True
            yield trial


@pytest.mark.parametrize("seed", range(12))
def test_swap_is_a_local_optimum_no_worse_than_greedy(seed):
    """No single swap lowers its error (checked by enumerating them), and it never loses to greedy."""
    rng = np.random.default_rng(seed)
    C, g = int(rng.integers(6, 11)), int(rng.choice([1, 3]))
    prob = random_problem(seed, C, g, ridge=float(rng.choice([0.0, 0.1])))
    k = int(rng.integers(2, C - 1))
    sel = select(prob, k, solver="swap")
    assert sel.mask.sum() == k and sel.status == "feasible"
    assert sel.objective == pytest.approx(prob.objective(sel.mask), rel=1e-12)
    tol = 1e-9 * prob.yy
    assert all(prob.objective(trial) >= sel.objective - tol for trial in _swaps(sel.mask))
    assert sel.objective <= select(prob, k, solver="greedy").objective + tol
    assert sel.objective >= brute_force(prob, k)[0] - tol


def test_swap_beats_greedy_where_forward_selection_is_trapped():
    """Two channels that are only useful together: greedy first takes the single best decoy and
    is stuck with it; the swap search (or backward elimination) finds the pair."""
    rng = np.random.default_rng(0)
    n = 400
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = a + b  # explained exactly by the pair (a, b)
    decoy = y + 0.5 * rng.normal(size=n)  # alone, the best single predictor of y
    X = np.c_[a - 0.9 * b, b, decoy, rng.normal(size=(n, 3))]
    from orprune import LayerProblem

    prob = LayerProblem.from_arrays(X, y[:, None])
    best = brute_force(prob, 2)[0]
    greedy = select(prob, 2, solver="greedy").objective
    swap = select(prob, 2, solver="swap").objective
    assert greedy > best * 10 + 1e-9
    assert swap == pytest.approx(best, rel=1e-9, abs=1e-9)
