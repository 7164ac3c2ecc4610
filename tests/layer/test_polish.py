"""Swap polishing for wide layers: every predicted swap error is the exact one, moves only improve."""

from __future__ import annotations

import time

import numpy as np
import pytest

from orprune import LayerProblem
from orprune.layer.solvers.paths import best_paths
from orprune.layer.solvers.polish import _PartSwaps, polish_swap
from tests.layer.instances import random_problem


def _combined(seed: int) -> LayerProblem:
    parts = [random_problem(seed + i, 9, g, ridge=1e-2, correlated=True) for i, g in enumerate((1, 3, 2))]
    return LayerProblem.combine(parts, scales=[1.0 / p.yy for p in parts])


PROBLEMS = {
    "g1": lambda: random_problem(0, 10, 1, ridge=1e-3, correlated=True),
    "g3": lambda: random_problem(1, 8, 3, ridge=1e-3, correlated=True),
    "wide_outputs": lambda: random_problem(2, 7, 2, ridge=1e-3, correlated=True, n_outputs=30),  # n_out > Cg
    "no_ridge_singular": lambda: random_problem(3, 8, 2, n_samples=10, correlated=True),  # fewer samples than columns
    "combined": lambda: _combined(4),
}


def _random_mask(rng: np.random.Generator, C: int, k: int) -> np.ndarray:
    mask = np.zeros(C, dtype=bool)
    mask[rng.choice(C, k, replace=False)] = True
    return mask


def _swap_errors(prob: LayerProblem, mask: np.ndarray) -> np.ndarray:
    kept, dropped = np.flatnonzero(mask), np.flatnonzero(~mask)
    out = np.empty((kept.size, dropped.size))
    for a, i in enumerate(kept):
        for b, j in enumerate(dropped):
            trial = mask.copy()
            trial[i], trial[j] = False, True
            out[a, b] = prob.objective(trial)
    return out


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_predicted_swap_errors_are_exact(name):
    prob = PROBLEMS[name]()
    rng = np.random.default_rng(7)
    components = prob.components or [(prob, 1.0)]
    for k in (1, prob.n_channels // 2, prob.n_channels - 1):
        mask = _random_mask(rng, prob.n_channels, k)
        kept, dropped = np.flatnonzero(mask), np.flatnonzero(~mask)
        results = [_PartSwaps(p, s).errors(kept, dropped) for p, s in components]
        predicted = sum(r[0] for r in results)
        current = sum(r[1] for r in results)
        # singular Gram without ridge: the minimum-norm least squares, same error up to rounding
        tol = (1e-7 if name == "no_ridge_singular" else 1e-9) * prob.yy
        assert abs(current - prob.objective(mask)) <= tol
        np.testing.assert_allclose(predicted, _swap_errors(prob, mask), rtol=0, atol=tol)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_polish_never_worsens_and_ends_in_a_local_optimum(name):
    prob = PROBLEMS[name]()
    rng = np.random.default_rng(11)
    for k in (2, prob.n_channels // 2):
        start = _random_mask(rng, prob.n_channels, k)
        mask, value, moves = polish_swap(prob, start)
        assert mask.sum() == k
        assert value == pytest.approx(prob.objective(mask), rel=1e-12, abs=1e-12 * prob.yy)
        assert value <= prob.objective(start) + 1e-12 * prob.yy
        assert (moves == 0) == np.array_equal(mask, start)
        # no single swap improves by more than the search's tolerance (a 1-swap local optimum)
        assert _swap_errors(prob, mask).min() >= value - 1e-8 * prob.yy


def test_polish_improves_the_path_on_correlated_layers_and_respects_the_deadline():
    prob = random_problem(2, 24, 2, ridge=1e-3, correlated=True)  # the path is not 1-swap optimal at 2 counts
    counts = np.arange(3, 22, 3)
    masks, errors = best_paths(prob, counts)
    polished = [polish_swap(prob, m)[1] for m in masks]
    assert all(p <= e + 1e-9 * prob.yy for p, e in zip(polished, errors))
    assert sum(polished) < sum(errors)  # swap moves help somewhere on the curve
    mask, value, moves = polish_swap(prob, masks[3], deadline=time.perf_counter() - 1.0)  # past: no round
    assert moves == 0 and np.array_equal(mask, masks[3])


def test_polish_validates_and_handles_trivial_counts():
    prob = random_problem(6, 5, 1, ridge=1e-3)
    with pytest.raises(ValueError, match="`mask`"):
        polish_swap(prob, np.ones(4, dtype=bool))
    for k in (0, 5):
        mask = np.arange(5) < k
        out, value, moves = polish_swap(prob, mask)
        assert moves == 0 and np.array_equal(out, mask) and value == prob.objective(mask)
