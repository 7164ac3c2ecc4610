"""The blocked forward / backward paths: exact errors at every keep count, greedy's quality or better."""

from __future__ import annotations

import numpy as np
import pytest

from orprune import LayerProblem, select
from orprune.budget.curves import error_curve
from orprune.layer.selection import AUTO_PATH_MIN_FEATURES, resolve_solver
from orprune.layer.solvers.greedy import greedy_path
from orprune.layer.solvers.local_search import backward_elimination
from orprune.layer.solvers.paths import best_paths, compress_outputs, nested_path
from tests.layer.instances import random_problem


def _refits(prob: LayerProblem, order: np.ndarray) -> np.ndarray:
    C = prob.n_channels
    return np.array([prob.objective(np.isin(np.arange(C), order[:k])) for k in range(C + 1)])


def _combined(seed: int) -> LayerProblem:
    parts = [random_problem(seed + i, 24, g, ridge=1e-2, correlated=True) for i, g in enumerate((1, 3, 2))]
    return LayerProblem.combine(parts, scales=[1.0 / p.yy for p in parts])


CASES = [
    (lambda: random_problem(0, 40, 1, ridge=1e-3, correlated=True), None),
    (lambda: random_problem(1, 30, 4, ridge=1e-3, correlated=True), 3),
    (lambda: random_problem(2, 70, 1, ridge=1e-3, correlated=True, n_outputs=90), None),  # n_out > Cg
    (lambda: random_problem(3, 64, 2, ridge=1e-3, correlated=True), 5),
    (lambda: _combined(4), 4),
]


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_path_errors_are_the_refit_errors_at_every_keep_count(direction, case):
    make, block = CASES[case]
    prob = make()
    for b in (block, 1):
        order, errors = nested_path(prob, direction, block=b)
        assert sorted(order.tolist()) == list(range(prob.n_channels))
        np.testing.assert_allclose(errors, _refits(prob, order), rtol=0, atol=1e-9 * prob.yy)
        assert errors[0] == pytest.approx(prob.yy)
        assert errors[-1] == pytest.approx(prob.full_objective, abs=1e-9 * prob.yy)


def test_one_channel_blocks_are_greedy_and_backward_elimination():
    prob = random_problem(5, 25, 3, ridge=1e-3, correlated=True)
    order, errors = nested_path(prob, "forward", block=1)
    greedy_order, greedy_errors = greedy_path(prob, prob.n_channels)
    np.testing.assert_array_equal(order, greedy_order)
    order, _ = nested_path(prob, "backward", block=1)
    for k in (3, 12, 20):
        np.testing.assert_array_equal(np.isin(np.arange(25), order[:k]), backward_elimination(prob, k))


def test_combined_problem_is_solved_per_consumer_with_the_same_path():
    prob = _combined(6)
    flat = LayerProblem._trusted(prob.gram.copy(), prob.cross.copy(), prob.yy, group_size=prob.group_size)
    # the combined problem's errors are summed per consumer; the flat block-diagonal matrix agrees
    assert prob.full_objective == pytest.approx(flat.full_objective, rel=1e-10)
    for mask in (np.arange(24) < 5, np.arange(24) % 3 == 0):
        assert prob.objective(mask) == pytest.approx(flat.objective(mask), rel=1e-10)
    for direction in ("forward", "backward"):
        order, errors = nested_path(prob, direction, block=3)
        flat_order, flat_errors = nested_path(flat, direction, block=3)
        np.testing.assert_array_equal(order, flat_order)
        np.testing.assert_allclose(errors, flat_errors, rtol=0, atol=1e-10 * prob.yy)


@pytest.mark.parametrize("seed", range(4))
def test_best_paths_are_at_least_as_good_as_greedy_on_average(seed):
    # Small layers use one-channel blocks, so the forward path is greedy itself: never worse at any
    # count. Wider ones use blocks of several channels: compare the average over the curve of the
    # error relative to greedy's (on these instances backward elimination is 15-28% lower).
    small = random_problem(seed, 20, 3, ridge=1e-3, correlated=True)
    _, errors = best_paths(small)
    assert np.all(errors <= greedy_path(small, 20)[1] + 1e-9 * small.yy)
    wide = random_problem(10 + seed, 160, 1, ridge=1e-3, correlated=True, n_samples=400)
    masks, errors = best_paths(wide)
    greedy_errors = greedy_path(wide, 160)[1]
    assert np.mean(errors[1:] / greedy_errors[1:]) <= 1.0
    for k in (1, 40, 80, 159):
        assert masks[k].sum() == k
        assert errors[k] == pytest.approx(wide.objective(masks[k]), abs=1e-9 * wide.yy)


def test_compressed_outputs_keep_every_error():
    prob = random_problem(7, 10, 2, ridge=1e-3, n_outputs=50)
    F = compress_outputs(prob.cross)
    assert F.shape == (20, 20)
    small = LayerProblem(prob.gram, F, prob.yy, group_size=2, ridge=prob.ridge)
    for mask in (np.arange(10) < 3, np.arange(10) % 2 == 0):
        assert small.objective(mask) == pytest.approx(prob.objective(mask), rel=1e-10)


def test_singular_gram_falls_back_to_the_forward_path():
    prob = random_problem(8, 30, 2, n_samples=20)  # 60 columns, 20 samples, no ridge
    with pytest.raises(np.linalg.LinAlgError):
        nested_path(prob, "backward")
    masks, errors = best_paths(prob, np.array([0, 5, 30]))
    assert [m.sum() for m in masks] == [0, 5, 30]
    assert errors[1] == pytest.approx(prob.objective(masks[1]), abs=1e-8 * prob.yy)


def test_path_solver_and_curve():
    prob = random_problem(9, 36, 2, ridge=1e-3, correlated=True)
    sel = select(prob, 10, solver="path")
    assert sel.k == 10 and sel.solver == "path"
    curve = error_curve(prob, [0, 5, 18, 36], solver="path")
    for k, mask, error in zip(curve.keep_counts, curve.masks, curve.errors):
        assert mask.sum() == k
        assert error == pytest.approx(prob.objective(mask), abs=1e-9 * prob.yy)
    assert curve.errors[2] <= error_curve(prob, [18], solver="greedy").errors[0] + 1e-9 * prob.yy
    assert resolve_solver("auto", 64, 64 * 9) == "greedy"
    assert resolve_solver("auto", 512, AUTO_PATH_MIN_FEATURES) == "path"
    with pytest.raises(ValueError, match="`direction`"):
        nested_path(prob, "sideways")
