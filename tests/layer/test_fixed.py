"""Selection with fixed (always kept) channels: the Schur-complement reduction is exact, and every
solver on it equals brute force over the free channels with the fixed ones kept (issue 21)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from orprune import LayerProblem
from orprune.layer.fixed import fix_channels, select_with_fixed
from orprune.layer.solvers import available_solvers
from tests.layer.instances import random_problem

SOLVERS = [s for s in ("exact", "greedy", "swap", "lasso", "perspective") if s in available_solvers()]


def brute_force_with_fixed(prob: LayerProblem, k: int, fixed: np.ndarray) -> tuple[float, np.ndarray]:
    """Optimum over all ``k``-channel masks containing every fixed channel."""
    free = np.flatnonzero(~fixed)
    best, best_mask = np.inf, None
    for kept in itertools.combinations(free, k - int(fixed.sum())):
        mask = fixed.copy()
        mask[list(kept)] = True
        value = prob.objective(mask)
        if value < best:
            best, best_mask = value, mask
    return best, best_mask


def planted_problem(seed: int, n_channels: int = 7, group_size: int = 2, ridge: float = 1e-3):
    """Y reads the fixed channels 0, 1 and the free channels 3, 5 (plus noise), channels independent."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(200, n_channels * group_size))
    W = np.zeros((n_channels * group_size, 3))
    for c in (0, 1, 3, 5):
        W[c * group_size:(c + 1) * group_size] = rng.normal(size=(group_size, 3)) + np.sign(rng.normal(size=(group_size, 3)))
    Y = X @ W + 0.05 * rng.normal(size=(200, 3))
    prob = LayerProblem.from_arrays(X, Y, group_size=group_size, ridge=ridge)
    fixed = np.zeros(n_channels, dtype=bool)
    fixed[[0, 1]] = True
    return prob, fixed


@pytest.mark.parametrize("ridge", [0.0, 0.5])
@pytest.mark.parametrize("fixed_idx", [[0, 3], [1], [0, 2, 4]])
def test_reduced_objective_equals_whole_objective_on_every_mask(ridge, fixed_idx):
    prob = random_problem(3, 6, 2, ridge=ridge, correlated=True)
    split = fix_channels(prob, fixed_idx)
    assert list(split.free) == [c for c in range(6) if c not in fixed_idx]
    for bits in itertools.product([False, True], repeat=split.reduced.n_channels):
        t = np.array(bits)
        whole = prob.objective(split.lift(t))
        assert split.reduced.objective(t) == pytest.approx(whole, rel=1e-9, abs=1e-9 * prob.yy)
    # the refit over the lifted mask has the reduced problem's objective
    _, value = prob.refit(split.lift(np.ones(split.reduced.n_channels, dtype=bool)))
    assert value == pytest.approx(prob.full_objective, rel=1e-9, abs=1e-9 * prob.yy)


def test_no_fixed_channel_gives_the_problem_itself():
    prob = random_problem(4, 5, 3, ridge=0.1)
    split = fix_channels(prob, np.zeros(5, dtype=bool))
    np.testing.assert_array_equal(split.reduced.gram, prob.gram)
    assert split.reduced.yy == prob.yy


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("k", [3, 4, 5])
def test_every_solver_equals_brute_force_on_a_planted_instance(solver, k):
    prob, fixed = planted_problem(k)
    best, _ = brute_force_with_fixed(prob, k, fixed)
    sel = select_with_fixed(prob, k, fixed, solver=solver)
    assert sel.k == k and sel.mask[fixed].all()
    assert sel.objective == pytest.approx(prob.objective(sel.mask), rel=1e-9)
    assert sel.objective == pytest.approx(best, rel=1e-7, abs=1e-9 * prob.yy)
    assert sel.bound <= sel.objective + 1e-9 * prob.yy
    np.testing.assert_allclose(sel.weights, prob.refit(sel.mask)[0], atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_exact_solver_equals_brute_force_on_correlated_instances(seed):
    prob = random_problem(seed, 7, 2, ridge=0.01, correlated=True)
    fixed = np.zeros(7, dtype=bool)
    fixed[np.random.default_rng(seed).choice(7, 2, replace=False)] = True
    for k in (3, 4, 5):
        best, _ = brute_force_with_fixed(prob, k, fixed)
        sel = select_with_fixed(prob, k, fixed, solver="exact")
        assert sel.status == "optimal"
        assert sel.objective == pytest.approx(best, rel=1e-7, abs=1e-9 * prob.yy)


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "exact"])
@pytest.mark.parametrize("seed", range(3))
def test_heuristics_keep_the_fixed_channels_and_are_never_below_the_optimum(solver, seed):
    prob = random_problem(seed, 7, 2, ridge=0.01, correlated=True)
    fixed = np.zeros(7, dtype=bool)
    fixed[[seed, 6]] = True
    best, _ = brute_force_with_fixed(prob, 4, fixed)
    sel = select_with_fixed(prob, 4, fixed, solver=solver)
    assert sel.mask[fixed].all() and sel.k == 4
    assert sel.objective >= best - 1e-9 * prob.yy


def test_bad_inputs():
    prob = random_problem(0, 4, 1)
    with pytest.raises(ValueError, match="`fixed`"):
        fix_channels(prob, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="`fixed`"):
        fix_channels(prob, np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="`k`"):
        select_with_fixed(prob, 1, [0, 1])
    with pytest.raises(ValueError, match="`problem`"):
        fix_channels("not a problem", [0])
