"""The allocation's cost model is checked against the counted model after surgery; a mismatch is corrected."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from orprune.network.cost_model import CostModel
from tests.models import fitted_greedy_pruner, one_thread  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def fitted():
    return fitted_greedy_pruner("resnet20")[2]


def _doctored(macs: CostModel, kind: str) -> CostModel:
    """A cost model that underestimates the counted MACs (as timm models' unpriced ops do)."""
    if kind == "constant":  # a fixed part the model does not price
        return dataclasses.replace(macs, constant=macs.constant - 0.05 * macs.evaluate(
            {u: 10**6 for u in macs.units}) / 10**12 - 0.05 * abs(macs.constant) - 1e3)
    # a per-channel cost the model prices 10% too low
    return CostModel(constant=macs.constant, linear={u: 0.9 * a for u, a in macs.linear.items()},
                     bilinear={k: 0.9 * b for k, b in macs.bilinear.items()})


@pytest.mark.parametrize("kind", ["constant", "scaled"])
def test_mismatched_cost_model_is_corrected_to_the_budget(fitted, kind):
    pruner = fitted
    true_costs = pruner.costs_
    try:
        pruner.costs_ = dataclasses.replace(true_costs, macs=_doctored(true_costs.macs, kind))
        budget = 0.5 * pruner.costs_.evaluate()["macs"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no "above the budget" warning
            result = pruner.prune(macs=0.5)
        assert result.macs_after <= budget * (1 + 1e-9)
        # the doctored model alone would have exceeded the budget: the check had something to correct
        assert true_costs.macs.evaluate(dict(result.allocation.keep)) == result.macs_after
    finally:
        pruner.costs_ = true_costs


def test_matching_cost_model_needs_no_correction(fitted):
    result = fitted.prune(macs=0.5)
    budget = 0.5 * fitted.costs_.evaluate()["macs"]
    assert result.macs_after <= budget * (1 + 1e-9)
    assert result.allocation.costs["macs"] == pytest.approx(result.macs_after, rel=1e-12)
