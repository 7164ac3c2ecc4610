"""The combinatorial branch and bound (``solver="bnb"``) against brute force, its node updates and bounds."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from orprune.layer.problem import LayerProblem
from orprune.layer.selection import select
from orprune.layer.solvers import available_solvers
from orprune.layer.solvers._perspective import perspective_split
from orprune.layer.solvers._tree import build_state, drop, keep, node_bounds
from tests.layer.instances import brute_force


def make_problem(rng, C, g, N, ridge, kind, n_out=3):
    """``independent`` columns, ``correlated`` channels (shared latent factors, the ``g`` columns of a
    channel near copies of one signal, like conv patches) or ``duplicates`` (exact copies of channels)."""
    if kind == "independent":
        X = rng.normal(size=(N, C * g))
    else:
        latent = rng.normal(size=(N, max(2, C // 2)))
        base = latent @ rng.normal(size=(latent.shape[1], C)) + 0.5 * rng.normal(size=(N, C))
        if kind == "duplicates":
            base[:, C - C // 2:] = base[:, :C // 2]  # the last channels copy the first ones
        X = np.repeat(base, g, axis=1) + (0.3 if kind != "duplicates" else 0.0) * rng.normal(size=(N, C * g))
        if kind == "duplicates":
            X += 0.3 * np.tile(rng.normal(size=(N, g)), C)
    Y = X @ rng.normal(size=(C * g, n_out)) + 0.05 * rng.normal(size=(N, n_out))
    return LayerProblem.from_arrays(X, Y, group_size=g, ridge=ridge)


def _cases(count):
    rng = np.random.default_rng(26)
    cases = []
    for i in range(count):
        g = int(rng.choice([1, 1, 3, 9]))
        C = int(rng.integers(3, (12 if g == 1 else 9) + 1))
        k = int(rng.integers(1, C))
        ridge = float(rng.choice([0.0, 0.0, 1e-3, 1.0]))
        kind = ("independent", "correlated", "correlated", "correlated", "duplicates")[i % 5]
        N = int(rng.integers(max(2, C * g // 3), C * g)) if i % 6 == 1 else 3 * C * g  # rank deficient
        relaxation = ("nodes", "root", "never")[i % 3]
        cases.append((i, C, g, k, N, ridge, kind, relaxation))
    return cases


def _check_exact(prob, k, sel, optimum):
    scale = prob.yy
    assert sel.status == "optimal"
    assert sel.k == k
    assert sel.objective == pytest.approx(prob.objective(sel.mask), rel=1e-12, abs=1e-12 * scale)
    assert sel.objective <= optimum * (1 + 1e-4) + 1e-9 * scale  # optimal within mip_rel_gap
    assert sel.bound <= optimum + 1e-9 * scale  # the bound is proven
    assert sel.bound <= sel.objective


CASES = _cases(240)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c[0]}")
def test_bnb_equals_brute_force(case):
    i, C, g, k, N, ridge, kind, relaxation = case
    prob = make_problem(np.random.default_rng(5000 + i), C, g, N, ridge, kind)
    options = {"node_split": i % 4 != 2, "branching": "bounds" if i % 5 == 3 else "removal"}
    sel = select(prob, k, solver="bnb", relaxation=relaxation, local_search=i % 7 != 0, **options)
    _check_exact(prob, k, sel, brute_force(prob, k)[0])
    assert "nodes" in sel.info and sel.info["log"][-1].startswith("final: optimal")


def test_cases_cover_the_advertised_variety():
    kinds = {(c[2] > 1, c[5] > 0, c[6]) for c in CASES}
    assert {(False, False, "correlated"), (True, True, "correlated"), (True, False, "duplicates")} <= kinds
    assert sum(c[4] < c[1] * c[2] for c in CASES) >= 30  # rank-deficient Gram matrices


def test_registered_as_exact():
    assert "bnb" in available_solvers()


# ---------------------------------------------------------------------------------- node updates and bounds
def _normalised(prob):
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    scale = float(np.mean(np.diag(H)))
    return H / scale, prob.cross / np.sqrt(scale * prob.yy)


def test_rank_g_updates_match_a_fresh_factorisation():
    prob = make_problem(np.random.default_rng(1), 8, 3, 200, 1e-3, "correlated")
    H, B = _normalised(prob)
    state = build_state(H, B, 3, (), np.arange(8))
    state = keep(state, np.array([2]), 3)  # keeps channel 2
    state = drop(state, np.array([0, 4]), 3)  # drops channels 0 and 5
    state = keep(state, np.array([1]), 3)  # keeps channel 3
    fresh = build_state(H, B, 3, (2, 3), [1, 4, 6, 7])
    assert state.kept == (2, 3) and list(state.free) == [1, 4, 6, 7]
    for name in ("P", "R", "M", "w"):
        np.testing.assert_allclose(getattr(state, name), getattr(fresh, name), rtol=1e-8, atol=1e-10)
    assert state.e0 == pytest.approx(prob.objective([2, 3]) / prob.yy, rel=1e-9)
    assert state.fA == pytest.approx(prob.objective([1, 2, 3, 4, 6, 7]) / prob.yy, rel=1e-9)


@pytest.mark.parametrize("g, ridge", [(1, 0.0), (3, 1e-3), (9, 0.5)])
def test_node_bounds_underestimate_every_completion(g, ridge):
    """At random nodes, the node bound and each child's bound are below every completion's error."""
    rng = np.random.default_rng(g)
    C, k = 9, 4
    prob = make_problem(rng, C, g, 4 * C * g, ridge, "correlated")
    H, B = _normalised(prob)
    D = perspective_split(H, g, "precision")
    for _ in range(6):
        order = rng.permutation(C)
        kept, free = tuple(sorted(order[:1].tolist())), np.sort(order[1:7])  # channels order[7:] dropped
        state = build_state(H, B, g, kept, free)
        m = k - len(kept)
        bounds = node_bounds(state, D[free], np.linalg.inv(D[free]), m, g)
        values = {}
        for chosen in itertools.combinations(range(free.size), m):
            values[chosen] = prob.objective(list(kept) + free[list(chosen)].tolist()) / prob.yy
        assert bounds.bound <= min(values.values()) + 1e-12
        for j in range(free.size):
            with_j = [v for c, v in values.items() if j in c]
            without_j = [v for c, v in values.items() if j not in c]
            assert bounds.keep_child[j] <= min(with_j) + 1e-12
            assert bounds.remove_child[j] <= min(without_j) + 1e-12


# ---------------------------------------------------------------------------------- time limit, log, input
def test_time_limit_returns_a_valid_mask_with_a_proven_bound():
    prob = make_problem(np.random.default_rng(3), 14, 9, 400, 1e-4, "correlated", n_out=8)
    optimum = brute_force(prob, 7)[0]
    with pytest.warns(RuntimeWarning, match="time limit"):
        sel = select(prob, 7, solver="bnb", time_limit=0.05, perspective_start=False)
    assert sel.status == "time_limit" and sel.k == 7
    assert sel.objective == pytest.approx(prob.objective(sel.mask), rel=1e-12)
    assert prob.full_objective - 1e-12 <= sel.bound <= optimum + 1e-9 * prob.yy
    assert sel.gap == pytest.approx((sel.objective - sel.bound) / sel.objective)
    assert sel.info["log"][-1].startswith("final: time_limit")


def test_proof_log_and_counters():
    prob = make_problem(np.random.default_rng(4), 12, 3, 300, 1e-3, "correlated", n_out=4)
    sel = select(prob, 6, solver="bnb")
    assert sel.status == "optimal"
    info = sel.info
    assert info["nodes"] >= 1 and info["root_bound"] <= sel.objective + 1e-12
    assert info["root_superset"] == pytest.approx(prob.full_objective, rel=1e-8, abs=1e-12)
    assert any("root:" in line for line in info["log"])
    assert info["cpu_time"] >= 0


@pytest.mark.parametrize("options, match", [
    ({"mip_rel_gap": 1.5}, "mip_rel_gap"),
    ({"mip_rel_gap": True}, "mip_rel_gap"),
    ({"relaxation": "sometimes"}, "relaxation"),
    ({"relax_iter": 0}, "relax_iter"),
    ({"initial": np.ones(6, dtype=bool)}, "initial"),
    ({"log_every": 0}, "log_every"),
    ({"branching": "random"}, "branching"),
    ({"time_limit": -1.0}, "time_limit"),
])
def test_bad_input_raises(options, match):
    prob = make_problem(np.random.default_rng(6), 6, 1, 50, 0.0, "correlated")
    with pytest.raises(ValueError, match=match):
        select(prob, 3, solver="bnb", **options)


def test_bad_k_raises():
    prob = make_problem(np.random.default_rng(6), 6, 1, 50, 0.0, "correlated")
    with pytest.raises(ValueError, match="`k`"):
        select(prob, 7, solver="bnb")
    from orprune.layer.solvers.bnb import solve_bnb

    with pytest.raises(ValueError, match="`k`"):
        solve_bnb(prob, 0)


def test_initial_mask_is_used_and_never_worsened():
    prob = make_problem(np.random.default_rng(7), 8, 3, 200, 0.0, "correlated")
    optimum, best_mask = brute_force(prob, 4)
    sel = select(prob, 4, solver="bnb", initial=best_mask, local_search=False)
    assert sel.status == "optimal" and sel.objective <= optimum * (1 + 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(prob, 4, solver="bnb", mip_rel_gap=0.0)  # complete search: no warning


def test_tree_size_estimate_is_close_on_a_small_tree():
    """Knuth's estimate is unbiased: on a small tree it is of the order of the nodes the search visits."""
    from orprune.layer.solvers._tree_search import TreeSearch

    prob = make_problem(np.random.default_rng(8), 10, 3, 300, 1e-3, "correlated", n_out=4)
    H, B = _normalised(prob)
    D = perspective_split(H, 3, "precision")
    incumbent = select(prob, 5, solver="swap").mask

    def engine():
        return TreeSearch(H, B, 3, 5, D, evaluate=lambda mask: prob.objective(mask) / prob.yy,
                          incumbent=incumbent, rel_gap=1e-4, deadline=None, relaxation="never")

    searched = engine()
    assert searched.run()
    mean, error = engine().estimate_tree_size(probes=40)
    assert np.isfinite(mean) and mean >= 1
    assert mean <= 20 * searched.stats.nodes and searched.stats.nodes <= 20 * mean
