"""The exact layer solver against brute force, its bounds, cuts, time limit and local search."""

from __future__ import annotations

import itertools
import time
import warnings

import numpy as np
import pytest

from orprune.layer.problem import LayerProblem
from orprune.layer.selection import select
from orprune.layer.solvers._nodes import pair_increases, reduce_problem, single_increases
from orprune.layer.solvers._perspective import (
    SPLITS,
    capped_simplex_weights,
    perspective_relaxation,
    perspective_split,
    spd_inverse,
)
from orprune.layer.solvers.greedy import greedy_path
from orprune.layer.solvers.local_search import SwapEvaluator, swap_local_search
from tests.layer.instances import brute_force


# ---------------------------------------------------------------------------------- instances
def make_problem(rng, C, g, N, ridge, kind="correlated", n_out=3):
    """Random layer problem; ``correlated`` mixes a few latent factors into every channel and
    makes the ``g`` columns of a channel near copies of one signal (like 3x3 conv patches)."""
    if kind == "independent":
        X = rng.normal(size=(N, C * g))
    else:
        latent = rng.normal(size=(N, max(2, C // 2)))
        base = latent @ rng.normal(size=(latent.shape[1], C)) + 0.5 * rng.normal(size=(N, C))
        X = np.repeat(base, g, axis=1) + 0.3 * rng.normal(size=(N, C * g))
    Y = X @ rng.normal(size=(C * g, n_out)) + 0.05 * rng.normal(size=(N, n_out))
    return LayerProblem.from_arrays(X, Y, group_size=g, ridge=ridge)


def _cases(seed, count, max_channels=12):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        g = int(rng.choice([1, 9]))
        C = int(rng.integers(3, min(max_channels, 12 if g == 1 else 10) + 1))
        k = int(rng.integers(1, C))
        ridge = float(rng.choice([0.0, 0.0, 1e-3, 1.0]))
        kind = "independent" if i % 5 == 0 else "correlated"
        # rank deficient (N < C g) in a quarter of the cases, with and without ridge
        N = int(rng.integers(max(2, C * g // 3), C * g)) if i % 4 == 1 else 3 * C * g
        cases.append((i, C, g, k, N, ridge, kind))
    return cases


def _assert_exact(prob, k, sel, optimum):
    scale = prob.yy
    assert sel.status == "optimal"
    assert sel.k == k
    assert sel.objective == pytest.approx(prob.objective(sel.mask), rel=1e-12, abs=1e-12 * scale)
    # optimal within the default relative gap 1e-4 ...
    assert sel.objective <= optimum * (1 + 1e-4) + 1e-9 * scale
    # ... and the bound is a proven lower bound on the true optimum
    assert sel.bound <= optimum + 1e-9 * scale
    assert sel.bound <= sel.objective
    assert sel.gap <= 1e-4 + 1e-12 or sel.objective - sel.bound <= 1e-9 * scale  # objective ~ 0


@pytest.mark.parametrize("case", _cases(0, 220), ids=lambda c: f"case{c[0]}")
def test_bnb_equals_brute_force(case):
    _, C, g, k, N, ridge, kind = case
    rng = np.random.default_rng(1000 + case[0])
    prob = make_problem(rng, C, g, N, ridge, kind)
    options = {"pairs": True, "branching": "dual"} if case[0] % 4 == 3 else {}
    sel = select(prob, k, solver="exact", **options)
    _assert_exact(prob, k, sel, brute_force(prob, k)[0])
    assert {"nodes", "leaves", "root_bound", "pruned"} <= set(sel.info)


@pytest.mark.parametrize("case", _cases(1, 14, max_channels=8), ids=lambda c: f"case{c[0]}")
def test_outer_approximation_equals_brute_force(case):
    _, C, g, k, N, ridge, kind = case
    prob = make_problem(np.random.default_rng(2000 + case[0]), C, g, N, ridge, kind)
    sel = select(prob, k, solver="exact", method="oa")
    _assert_exact(prob, k, sel, brute_force(prob, k)[0])


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("options", [{}, {"pairs": True}, {"relaxation": False}, {"branching": "dual"}])
def test_every_split_and_option_is_exact(split, options):
    rng = np.random.default_rng(7)
    for _ in range(2):
        prob = make_problem(rng, 8, 9, 200, ridge=0.05)
        sel = select(prob, 4, solver="exact", split=split, **options)
        _assert_exact(prob, 4, sel, brute_force(prob, 4)[0])


# ---------------------------------------------------------------------------------- bounds and cuts
def _hessian(prob):
    return prob.gram + prob.ridge * np.eye(prob.n_features)


@pytest.mark.parametrize("split", SPLITS)
def test_split_is_dominated_by_the_hessian(split):
    prob = make_problem(np.random.default_rng(3), 7, 9, 150, ridge=0.1)
    H = _hessian(prob)
    blocks = perspective_split(H, 9, split, ridge=prob.ridge)
    D = np.zeros_like(H)
    for c, block in enumerate(blocks):
        D[c * 9:(c + 1) * 9, c * 9:(c + 1) * 9] = block
    assert np.linalg.eigvalsh(H - D)[0] >= -1e-9 * np.trace(H)
    assert np.all(np.linalg.eigvalsh(blocks) >= -1e-12)


@pytest.mark.parametrize("split", SPLITS)
def test_dual_cuts_underestimate_every_mask(split):
    """Every cut of the relaxation iterates is below f at every binary point (any k)."""
    rng = np.random.default_rng(4)
    prob = make_problem(rng, 6, 3, 60, ridge=0.2)
    H = _hessian(prob)
    D = perspective_split(H, 3, split, ridge=prob.ridge)
    cuts = []
    relaxation = perspective_relaxation(H, prob.cross, prob.yy, D, 3, max_iter=15, cuts=cuts)
    assert len(cuts) >= 1
    for bits in itertools.product([0, 1], repeat=6):
        z = np.array(bits, dtype=float)
        value = prob.objective(z.astype(bool))
        for constant, slopes in cuts:
            assert constant - slopes @ z <= value + 1e-9 * prob.yy
    assert relaxation.bound <= brute_force(prob, 3)[0] + 1e-9 * prob.yy
    assert relaxation.bound <= relaxation.primal + 1e-9 * prob.yy


def test_precision_split_is_stronger_than_the_ridge_split():
    prob = make_problem(np.random.default_rng(5), 10, 9, 300, ridge=1e-3)
    H = _hessian(prob)
    bounds = {split: perspective_relaxation(H, prob.cross, prob.yy, perspective_split(H, 9, split, ridge=prob.ridge),
                                            5, max_iter=300, rel_tol=1e-7).bound for split in ("ridge", "precision")}
    assert bounds["ridge"] < bounds["precision"] <= brute_force(prob, 5)[0] + 1e-9 * prob.yy


def test_capped_simplex_weights_minimise_the_perspective_sum():
    rng = np.random.default_rng(6)
    for _ in range(20):
        a = rng.random(9) ** 3
        m = int(rng.integers(1, 9))
        z = capped_simplex_weights(a, m)
        assert z.sum() == pytest.approx(m)
        assert np.all((z >= 0) & (z <= 1 + 1e-12))
        value = np.sum(a**2 / z)
        for _ in range(200):  # random feasible points are never better
            other = rng.dirichlet(np.ones(9)) * m
            if np.all(other <= 1):
                assert value <= np.sum(a**2 / other) + 1e-12


def test_removal_increases_match_direct_refits():
    rng = np.random.default_rng(8)
    prob = make_problem(rng, 7, 3, 80, ridge=0.1)
    H = _hessian(prob)
    kept, free = [1, 4], [0, 2, 3, 5, 6]
    P, R, e0 = reduce_problem(H, prob.cross, prob.yy, 3, kept, free)
    assert e0 == pytest.approx(prob.objective(kept))
    M = spd_inverse(P)
    w = M @ R
    f_all = e0 - np.sum(R * w)
    assert f_all == pytest.approx(prob.full_objective)
    delta = single_increases(M, w, 3)
    pairs = pair_increases(M, w, 3)
    for i, c in enumerate(free):
        assert f_all + delta[i] == pytest.approx(prob.objective([x for x in range(7) if x != c]))
        for j in range(i + 1, len(free)):
            drop = {c, free[j]}
            assert f_all + pairs[i, j] == pytest.approx(prob.objective([x for x in range(7) if x not in drop]))


# ---------------------------------------------------------------------------------- time limit
def test_time_limit_returns_incumbent_bound_and_warning():
    prob = make_problem(np.random.default_rng(9), 28, 9, 600, ridge=1e-3)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select(prob, 14, solver="exact", time_limit=0.5)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert sel.status in ("time_limit", "optimal")
    assert sel.k == 14
    assert sel.objective == pytest.approx(prob.objective(sel.mask))
    assert prob.full_objective - 1e-9 * prob.yy <= sel.bound <= sel.objective
    greedy = select(prob, 14, solver="greedy")
    assert sel.objective <= greedy.objective + 1e-12 * prob.yy
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if sel.status == "time_limit":
        assert any("gap" in message for message in messages)
        assert f"{sel.gap:.3e}" in sel.message
    else:
        assert sel.gap <= 1e-4


def test_outer_approximation_honours_the_time_limit():
    prob = make_problem(np.random.default_rng(10), 20, 9, 500, ridge=1e-3)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel = select(prob, 10, solver="exact", method="oa", time_limit=0.5)
    assert time.perf_counter() - start < 5.0
    assert sel.status in ("time_limit", "optimal")
    assert sel.bound <= sel.objective


# ---------------------------------------------------------------------------------- local search
@pytest.mark.parametrize("seed", range(8))
def test_local_search_never_worsens_greedy(seed):
    rng = np.random.default_rng(seed)
    C, g = int(rng.integers(5, 14)), int(rng.choice([1, 9]))
    prob = make_problem(rng, C, g, 3 * C * g if seed % 3 else C * g // 2, ridge=float(rng.choice([0.0, 0.1])))
    k = int(rng.integers(1, C))
    order, _ = greedy_path(prob, k)
    mask = np.zeros(C, dtype=bool)
    mask[order] = True
    better, value, moves = swap_local_search(prob, mask)
    assert better.sum() == k
    assert value == pytest.approx(prob.objective(better))
    assert value <= prob.objective(mask) + 1e-12 * prob.yy
    if moves == 0:
        assert np.array_equal(better, mask)


def test_local_search_ends_at_a_swap_local_optimum():
    prob = make_problem(np.random.default_rng(11), 9, 3, 100, ridge=0.1)
    mask = np.zeros(9, dtype=bool)
    mask[:4] = True
    better, value, _ = swap_local_search(prob, mask)
    for i in np.flatnonzero(better):
        for j in np.flatnonzero(~better):
            trial = better.copy()
            trial[i], trial[j] = False, True
            assert prob.objective(trial) >= value - 1e-9 * prob.yy


def test_swap_evaluator_predicts_every_neighbour():
    prob = make_problem(np.random.default_rng(12), 8, 3, 90, ridge=0.3)
    evaluator = SwapEvaluator(_hessian(prob), prob.cross, prob.yy, 3)
    kept = np.array([0, 3, 5])
    dropped = np.setdiff1d(np.arange(8), kept)
    errors, current = evaluator.neighbourhood(kept)
    assert current == pytest.approx(prob.objective(kept))
    for a, i in enumerate(kept):
        for b, j in enumerate(dropped):
            assert errors[a, b] == pytest.approx(prob.objective(sorted(set(kept) - {i} | {j})))


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mip_rel_gap": -1.0}, "`mip_rel_gap`"),
        ({"mip_rel_gap": 1.0}, "`mip_rel_gap`"),
        ({"method": "scip"}, "`method`"),
        ({"split": "sdp"}, "`split`"),
        ({"initial": np.ones(6, dtype=bool)}, "`initial`"),
        ({"initial": [1, 0, 1, 0, 1, 0]}, "`initial`"),
        ({"relax_iter": 0}, "`relax_iter`"),
        ({"branching": "random"}, "`branching`"),
    ],
)
def test_bad_options_are_rejected(options, match):
    prob = make_problem(np.random.default_rng(13), 6, 1, 40, ridge=0.1)
    with pytest.raises(ValueError, match=match):
        select(prob, 3, solver="exact", **options)


def test_initial_mask_is_used_as_warm_start():
    prob = make_problem(np.random.default_rng(14), 8, 3, 90, ridge=0.1)
    optimum = brute_force(prob, 4)[0]
    best = min(itertools.combinations(range(8), 4), key=lambda S: prob.objective(list(S)))
    initial = np.zeros(8, dtype=bool)
    initial[list(best)] = True
    sel = select(prob, 4, solver="exact", initial=initial, local_search=False)
    assert sel.objective == pytest.approx(optimum)
    assert sel.info["start_objective"] == pytest.approx(optimum)


def test_perspective_start_keeps_the_search_exact_and_never_worse_than_the_rounding():
    small = make_problem(np.random.default_rng(15), 8, 9, 200, ridge=1e-3)
    _assert_exact(small, 4, select(small, 4, solver="exact", perspective_start=True), brute_force(small, 4)[0])
    # > 16 channels: the start is on by default; on this instance greedy, backward elimination and
    # their swap polish all end 5% above the perspective rounding
    wide = make_problem(np.random.default_rng(3), 20, 9, 500, ridge=1e-3)
    rounding = select(wide, 10, solver="perspective")
    # a generous limit: the perspective start runs inside it, and a loaded CI machine needed more than 1 s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sel = select(wide, 10, solver="exact", time_limit=30.0)
    assert sel.objective <= rounding.objective + 1e-12 * wide.yy
    assert sel.info["start_objective"] <= rounding.objective + 1e-12 * wide.yy
