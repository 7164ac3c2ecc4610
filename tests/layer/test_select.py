"""The contract every registered solver keeps, and the behaviour of `select` itself."""

import numpy as np
import pytest

import orprune
from orprune import LayerProblem, select
from orprune.layer.solvers import SOLVERS
from tests.layer.instances import brute_force, random_problem

SOLVER_NAMES = sorted(SOLVERS)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_every_solver_returns_a_consistent_selection(solver, seed):
    prob = random_problem(seed, 7, 1 + 2 * seed, ridge=0.05 * seed, correlated=bool(seed % 2))
    optimum, _ = brute_force(prob, 3)
    sel = select(prob, 3, solver=solver, time_limit=30)
    assert sel.mask.dtype == bool and sel.mask.shape == (7,) and sel.k == 3
    assert sel.solver == solver and sel.success
    assert sel.objective == pytest.approx(prob.objective(sel.mask), rel=1e-9)
    weights, _ = prob.refit(sel.mask)
    np.testing.assert_allclose(sel.weights, weights, rtol=1e-9, atol=1e-12)
    tol = 1e-7 * prob.yy
    assert sel.bound <= optimum + tol  # a proven lower bound never exceeds the optimum
    assert sel.objective >= optimum - tol
    assert sel.gap == pytest.approx(max(sel.objective - sel.bound, 0) / sel.objective, rel=1e-9)
    if sel.status == orprune.OPTIMAL:
        assert sel.objective == pytest.approx(optimum, rel=1e-6)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_trivial_counts_are_optimal(solver):
    prob = random_problem(0, 5, 2)
    empty = select(prob, 0, solver=solver)
    full = select(prob, 5, solver=solver)
    assert empty.status == full.status == orprune.OPTIMAL
    assert not empty.mask.any() and full.mask.all()
    assert empty.objective == pytest.approx(prob.yy)
    assert full.objective == pytest.approx(prob.full_objective)


def test_greedy_is_optimal_for_orthogonal_channels():
    # With X^T X diagonal the gains are independent, so greedy = best subset.
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(40, 8)))
    X = Q * rng.uniform(0.5, 3.0, size=8)
    Y = X @ rng.normal(size=(8, 2)) + 0.1 * rng.normal(size=(40, 2))
    prob = LayerProblem.from_arrays(X, Y)
    for k in range(1, 8):
        assert select(prob, k, solver="greedy").objective == pytest.approx(brute_force(prob, k)[0], rel=1e-9)


def test_greedy_path_errors_are_the_refit_errors_of_its_prefixes():
    prob = random_problem(1, 9, 4, ridge=0.1, correlated=True)
    order, errors = orprune.greedy_path(prob, 9)
    assert sorted(order) == list(range(9))
    for j in range(10):
        assert errors[j] == pytest.approx(prob.objective(order[:j]), rel=1e-8, abs=1e-9 * prob.yy)
    assert np.all(np.diff(errors) <= 1e-9 * prob.yy)


def test_magnitude_keeps_the_largest_weight_norms():
    prob = random_problem(2, 6, 3)
    weights = np.zeros((18, 3))
    norms = np.array([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    weights[::3, 0] = norms  # one nonzero per channel: its norm
    with_weights = LayerProblem.from_statistics(prob.gram, prob.cross, prob.yy, group_size=3, weights=weights)
    assert set(select(with_weights, 3, solver="magnitude").kept) == {0, 2, 4}
    with pytest.raises(ValueError, match="norm"):
        select(with_weights, 3, solver="magnitude", norm="l3")


def test_auto_resolves_by_layer_size():
    small = random_problem(0, 6, 1)
    assert select(small, 2, solver="auto").solver == ("exact" if "exact" in SOLVERS else "greedy")
    big = random_problem(0, orprune.layer.selection.AUTO_EXACT_MAX_CHANNELS + 1, 1)
    assert select(big, 2, solver="auto").solver == "greedy"


def test_registry_lists_available_solvers():
    assert {"greedy", "magnitude"} <= set(orprune.available_solvers())
    assert all(isinstance(SOLVERS[name].exact, bool) for name in SOLVERS)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": -1}, ValueError, r"`k` must lie in \[0, 5\]"),
        ({"k": 6}, ValueError, r"`k` must lie in \[0, 5\]"),
        ({"k": 2.5}, ValueError, "`k` must be an integer"),
        ({"k": True}, ValueError, "`k` must be an integer"),
        ({"k": 2, "solver": "simplex"}, ValueError, "`solver` must be one of"),
        ({"k": 2, "time_limit": 0}, ValueError, "`time_limit`"),
        ({"k": 2, "time_limit": float("nan")}, ValueError, "`time_limit`"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    prob = random_problem(0, 5, 1)
    with pytest.raises(error, match=match):
        select(prob, **kwargs)


def test_select_rejects_non_problems():
    with pytest.raises(ValueError, match="`prob` must be a LayerProblem"):
        select(np.eye(3), 1)


def test_missing_package_is_a_specific_error(monkeypatch):
    from orprune.layer.solvers.registry import SolverSpec

    spec = SOLVERS["greedy"]
    monkeypatch.setitem(SOLVERS, "needs_missing", SolverSpec("needs_missing", spec.func, False,
                                                             ("surely_not_a_module",), ""))
    with pytest.raises(ImportError, match="surely_not_a_module"):
        select(random_problem(0, 4, 1), 2, solver="needs_missing")
    assert "needs_missing" not in orprune.available_solvers()


@pytest.mark.parametrize("solver", ["greedy", "magnitude"])
def test_error_curve_matches_refits_and_is_feasible(solver):
    from orprune.budget.curves import error_curve

    prob = random_problem(3, 8, 2, ridge=0.01, correlated=True)
    curve = error_curve(prob, solver=solver)
    assert curve.keep_counts.tolist() == list(range(9))
    for k, mask, err, bound in zip(curve.keep_counts, curve.masks, curve.errors, curve.bounds):
        assert mask.sum() == k
        assert err == pytest.approx(prob.objective(mask), rel=1e-8, abs=1e-9 * prob.yy)
        assert bound <= err + 1e-9 * prob.yy
    assert curve.errors[0] == pytest.approx(prob.yy) and curve.relative_errors[0] == pytest.approx(1.0)
    partial = error_curve(prob, [6, 2, 2], solver=solver)
    assert partial.keep_counts.tolist() == [2, 6]
    if solver == "greedy":  # nested sets: a partial curve is a slice of the full one
        np.testing.assert_array_equal(partial.mask_for(6), curve.mask_for(6))
    with pytest.raises(ValueError, match="keep_counts"):
        error_curve(prob, [9], solver=solver)
    with pytest.raises(ValueError, match="not on this curve"):
        partial.mask_for(3)


def test_curves_solved_one_count_at_a_time_join_into_the_whole_curve():
    from orprune.budget.curves import error_curve, join_curves

    prob = random_problem(4, 7, 3, ridge=0.01, correlated=True)
    whole = error_curve(prob, solver="exact")
    parts = [error_curve(prob, [k], solver="exact") for k in (5, 0, 7, 3, 1, 2, 6, 4)]
    joined = join_curves(parts)
    np.testing.assert_array_equal(joined.keep_counts, whole.keep_counts)
    np.testing.assert_array_equal(joined.masks, whole.masks)
    np.testing.assert_allclose(joined.errors, whole.errors, rtol=1e-12)
    np.testing.assert_allclose(joined.bounds, whole.bounds, rtol=1e-12)
    assert joined.statuses == whole.statuses and joined.solver == "exact"
    assert joined.errors.tolist() == sorted(joined.errors.tolist(), reverse=True)  # optimal: monotone
    with pytest.raises(ValueError, match="repeat keep counts"):
        join_curves(parts + parts[:1])
    with pytest.raises(ValueError, match="same layer and solver"):
        join_curves([parts[0], error_curve(prob, [2], solver="greedy")])
    with pytest.raises(ValueError, match="at least one"):
        join_curves([])
