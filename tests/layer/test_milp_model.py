from __future__ import annotations

import itertools

import numpy as np
import pyomo.environ as pyo
import pytest

from orprune.layer.milp_model import big_m, solve_scip, to_pyomo, write_model
from orprune.layer.problem import LayerProblem
from tests.layer.instances import brute_force


def make_problem(seed: int = 0, C: int = 4, g: int = 2, n_out: int = 2, ridge: float = 0.1) -> LayerProblem:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(30, C * g)) + 0.5 * rng.normal(size=(30, 1))
    Y = X @ rng.normal(size=(C * g, n_out)) + 0.3 * rng.normal(size=(30, n_out))
    return LayerProblem.from_arrays(X, Y, group_size=g, ridge=ridge)


@pytest.mark.parametrize("suffix", [".lp", ".mps"])
def test_scip_reads_exported_model_and_finds_brute_force_optimum(tmp_path, suffix):
    pyscipopt = pytest.importorskip("pyscipopt")
    prob = make_problem()
    optimum, best = brute_force(prob, 2)
    path = write_model(prob, 2, tmp_path / f"layer{suffix}")
    model = pyscipopt.Model()
    model.hideOutput()
    model.readProblem(str(path))
    model.optimize()
    assert model.getStatus() == "optimal"
    # the constant ||Y||^2 travels in the file: SCIP's value is f(S*) itself
    assert model.getObjVal() == pytest.approx(optimum, rel=1e-6)
    solution = model.getBestSol()
    z = {v.name: model.getSolVal(solution, v) for v in model.getVars() if v.name.startswith("z")}
    kept = sorted(int(name.strip("z[]()_")) for name, value in z.items() if value > 0.5)
    np.testing.assert_array_equal(kept, np.flatnonzero(best))


def test_pyomo_objective_is_f_at_every_mask():
    prob = make_problem(1, C=4, g=2, n_out=3)
    model = to_pyomo(prob, 2)
    optimum, _ = brute_force(prob, 2)
    for S in itertools.combinations(range(4), 2):
        mask = np.zeros(4, dtype=bool)
        mask[list(S)] = True
        weights, value = prob.refit(mask)
        for c in range(4):
            model.z[c].set_value(float(mask[c]))
        for (i, o), w in np.ndenumerate(weights):
            model.W[i, o].set_value(w)
        assert pyo.value(model.error) == pytest.approx(value, rel=1e-10)
        assert pyo.value(model.error) == pytest.approx(prob.objective(mask), rel=1e-10)
        if value <= optimum * (1 + 1e-12):  # the optimum's refit satisfies the big-M links
            for constraint in (model.link_upper, model.link_lower):
                assert all(pyo.value(constraint[idx].upper) is None or
                           pyo.value(constraint[idx].body) <= pyo.value(constraint[idx].upper) + 1e-9
                           for idx in constraint)
    assert sum(1 for _ in model.component_data_objects(pyo.Var)) == 4 + prob.n_features * 3


def test_big_m_covers_every_selection_better_than_the_upper_bound():
    prob = make_problem(2, C=6, g=2, n_out=2, ridge=0.05)
    k = 3
    values = {S: prob.objective(np.array(S)) for S in itertools.combinations(range(6), k)}
    upper = float(np.median(list(values.values())))
    M = big_m(prob, k, upper_bound=upper)
    covered = 0
    for S, value in values.items():
        if value <= upper:
            weights, _ = prob.refit(np.array(S))
            assert np.all(np.abs(weights) <= M)
            covered += 1
    assert covered >= len(values) // 2
    # default upper bound (greedy) is valid too: the optimum's weights fit
    _, best = brute_force(prob, k)
    assert np.all(np.abs(prob.refit(best)[0]) <= big_m(prob, k))


def test_big_m_needs_a_nonsingular_hessian():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3, 8))  # fewer samples than features: G singular
    prob = LayerProblem.from_arrays(X, X[:, :2], group_size=2, ridge=0.0)
    with pytest.raises(ValueError, match="`ridge`"):
        big_m(prob, 2)


def test_direct_scip_model_matches_brute_force():
    pytest.importorskip("pyscipopt")
    prob = make_problem(4, C=5, g=1, n_out=3)
    optimum, best = brute_force(prob, 2)
    worst = max(itertools.combinations(range(5), 2), key=lambda S: prob.objective(np.array(S)))
    selection = solve_scip(prob, 2, time_limit=60, warm_start=np.array(worst))
    assert selection.status == "optimal"
    assert selection.info["warm_start_accepted"]
    np.testing.assert_array_equal(selection.mask, best)
    assert selection.objective == pytest.approx(optimum, rel=1e-10)
    assert selection.bound == pytest.approx(optimum, rel=1e-5)


def test_bad_arguments(tmp_path):
    prob = make_problem()
    with pytest.raises(ValueError, match="`path`"):
        write_model(prob, 2, tmp_path / "layer.txt")
    with pytest.raises(ValueError, match="`k`"):
        to_pyomo(prob, 5)
    with pytest.raises(ValueError, match="`prob`"):
        to_pyomo("not a problem", 1)


def test_to_pyomo_at_the_package_root_is_the_same_model():
    import orprune

    prob = make_problem(11)
    model = orprune.to_pyomo(prob, 2)
    assert len(model.z) == 4 and model.cardinality.upper == 2
    reference = to_pyomo(prob, 2)
    assert (model.nvariables(), model.nconstraints()) == (reference.nvariables(), reference.nconstraints())
