"""Polish at the allocated counts, then re-check: errors only fall, and the final allocation is optimal
for the updated curves (brute force over every allocation)."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import orprune
from orprune.budget.allocation import AllocationProblem, CostModel, allocate
from orprune.budget.curves import ErrorCurve
from orprune.budget.recheck import recheck_allocation, replace_point
from tests.models import one_thread  # noqa: F401  (module fixture)


def _curve(rng: np.random.Generator, C: int, counts: np.ndarray) -> ErrorCurve:
    errors = np.sort(rng.uniform(0.0, 1.0, counts.size))[::-1] * rng.uniform(0.5, 2.0)
    masks = np.zeros((counts.size, C), dtype=bool)
    for i, k in enumerate(counts):
        masks[i, :k] = True
    return ErrorCurve(keep_counts=counts, errors=errors, bounds=np.zeros(counts.size), statuses=("feasible",) * counts.size,
                      masks=masks, solver="path", scale=1.0, solve_time=0.0)


def _brute_force(curves, cost: CostModel, budget: float) -> float:
    units = list(curves)
    best = math.inf
    for combo in itertools.product(*(range(curves[u].keep_counts.size) for u in units)):
        keep = {u: int(curves[u].keep_counts[o]) for u, o in zip(units, combo)}
        if cost.evaluate(keep) <= budget * (1 + 1e-9):
            best = min(best, math.fsum(float(curves[u].errors[o]) for u, o in zip(units, combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_recheck_is_optimal_for_the_polished_curves(seed):
    rng = np.random.default_rng(seed)
    C = 8
    counts = np.array([1, 3, 5, 8])
    units = ["a", "b", "c", "d"]
    curves = {u: _curve(rng, C, counts) for u in units}
    original = copy.deepcopy(curves)
    cost = CostModel(linear={"a": 2.0, "d": 1.0}, bilinear={("a", "b"): 1.0, ("b", "c"): 0.5, ("c", "d"): 1.5})
    budget = 0.45 * cost.evaluate({u: C for u in units})
    factors = {(u, k): rng.uniform(0.2, 1.0) for u in units for k in counts}  # what "swap" would find

    def polish(u, k, mask):
        i = int(np.flatnonzero(counts == k)[0])
        moved = np.roll(mask, 1)  # another mask of k channels
        return moved, float(original[u].errors[i] * factors[u, k]), 1

    def solve(cs):
        problem = AllocationProblem(options={u: c.keep_counts for u, c in cs.items()},
                                    errors={u: c.errors for u, c in cs.items()})
        return allocate(problem, costs={"macs": cost}, budgets={"macs": budget})

    done: dict = {}
    polished_units = {"a", "b", "c"}  # "d" does not come from a path
    allocation, points = recheck_allocation(curves, solve, polish, polished_units, done=done)
    for u in units:  # errors never above the path's; unpolished units unchanged
        assert np.all(curves[u].errors <= original[u].errors)
        if u not in polished_units:
            np.testing.assert_array_equal(curves[u].errors, original[u].errors)
    assert allocation.objective == pytest.approx(_brute_force(curves, cost, budget), rel=1e-9, abs=1e-12)
    for p in points:
        assert p.error_after <= p.error_before and p.unit in polished_units
        i = int(np.flatnonzero(counts == p.keep)[0])
        assert curves[p.unit].errors[i] == p.error_after and curves[p.unit].masks[i].sum() == p.keep
    # stable: every chosen point of a polished unit was polished (or is the full width)
    for u, k in allocation.keep.items():
        if u in polished_units and k < C:
            assert k in done[u]
    # a second call with the same `done` polishes nothing and returns the same allocation
    again, more = recheck_allocation(curves, solve, polish, polished_units, done=done)
    assert more == [] and dict(again.keep) == dict(allocation.keep)


def test_replace_point_checks_the_mask():
    curve = _curve(np.random.default_rng(0), 6, np.array([2, 4, 6]))
    with pytest.raises(ValueError, match="`mask`"):
        replace_point(curve, 4, np.ones(6, dtype=bool), 0.0)
    new = replace_point(curve, 4, np.arange(6) >= 2, 0.01)
    assert new.errors[1] == 0.01 and curve.errors[1] != 0.01 and new.masks[1].tolist() == [False, False] + [True] * 4


class _Net(nn.Module):
    """Three prunable units of 10 channels (3x3 convs): the path solver, small enough to enumerate."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 10, 3, padding=1), nn.Conv2d(10, 10, 3, padding=1), nn.Conv2d(10, 10, 3)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.head(torch.relu(self.c3(x)))


def test_pruner_polishes_path_units_and_allocation_is_optimal_for_the_polished_curves():
    torch.manual_seed(0)
    model = _Net().eval()
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(48, 3, 8, 8, generator=gen)
    calibration = [base[i : i + 16] + 0.8 * base[i : i + 16].roll(1, dims=1) for i in range(0, 48, 16)]  # correlated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="path", max_options=5, progress=False, positions_per_image=8, seed=0)
        pruner.fit(model, calibration)
    before = copy.deepcopy(pruner.curves_)
    result = pruner.prune(macs=0.45)
    assert result.polished, "the chosen points of path curves are polished"
    units = list(pruner.curves_)
    for u in units:
        assert np.all(pruner.curves_[u].errors <= before[u].errors)
        for k, mask, err in zip(pruner.curves_[u].keep_counts, pruner.curves_[u].masks, pruner.curves_[u].errors):
            assert mask.sum() == k and err == pytest.approx(pruner.unit_problems_[u].objective(mask), rel=1e-7, abs=1e-12)
    budget = 0.45 * pruner.costs_.evaluate()["macs"]
    assert result.allocation.objective == pytest.approx(_brute_force(pruner.curves_, pruner.costs_.macs, budget),
                                                        rel=1e-9, abs=1e-12)
    assert result.macs_after <= budget * (1 + 1e-9)
    reported = {r.unit: r.solver for r in result.report}
    assert all(reported[p.unit] == "path+swap" for p in result.polished if result.allocation.keep[p.unit] == p.keep)
    # without polishing: the path curves as they were
    plain = orprune.Pruner(solver="path", max_options=5, progress=False, positions_per_image=8, polish_time=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain.fit(model, calibration)
    assert plain.prune(macs=0.45).polished == ()
    with pytest.raises(ValueError, match="`polish_time`"):
        orprune.Pruner(polish_time=-1.0).fit(model, calibration)
