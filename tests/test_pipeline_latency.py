"""Pruner.prune(latency=, latency_rounds=0): the table budget is met exactly and optimally, reported, validated.

The latency timer is mocked (deterministic, not monotone in the width) so the allocation is reproducible.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import orprune.network.latency as latency_module
from orprune.pipeline import Pruner
from tests.models import TinyNet, one_thread  # noqa: F401  (one_thread: module fixture)


def fake_fastest_time(module: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Conv time grows with the widths, but an odd output width costs extra (as a kernel's vector tail might)."""
    if isinstance(module, nn.Conv2d):
        return 1e-3 * (module.in_channels * module.out_channels + 3 * (module.out_channels % 2))
    return 0.02  # the whole model


@pytest.fixture
def pruner(monkeypatch, tmp_path):
    monkeypatch.setattr(latency_module, "fastest_time", fake_fastest_time)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the default cache directory, under the test's tmp
    torch.manual_seed(0)
    model = TinyNet().eval()
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, 2, 6, 6, generator=gen) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Pruner(solver="greedy", progress=False).fit(model, calibration)


def brute_force(pruner: Pruner, budgets: dict, costs: dict) -> float:
    units = list(pruner.curves_)
    best = math.inf
    for combo in itertools.product(*(pruner.curves_[u].keep_counts for u in units)):
        keep = dict(zip(units, map(int, combo)))
        if all(costs[n].evaluate(keep) <= b for n, b in budgets.items()):
            best = min(best, sum(float(pruner.curves_[u].errors[list(pruner.curves_[u].keep_counts).index(k)])
                                 for u, k in keep.items()))
    return best


@pytest.mark.parametrize("fraction", [0.45, 0.6, 0.8])
def test_latency_budget_is_met_on_the_tables_and_optimal(pruner, fraction):
    pruner.fit_latency(batch_size=4)
    lat = pruner.latency_
    assert lat.batch_size == 4 and lat.cache_file is not None
    result = pruner.prune(latency=fraction, latency_rounds=0)
    budget = fraction * lat.full
    keep = dict(result.allocation.keep)
    # the chosen counts re-evaluated on the tables, independently of the MILP
    assert lat.cost.evaluate(keep) <= budget * (1 + 1e-12)
    assert result.latency.predicted == pytest.approx(lat.cost.evaluate(keep))
    assert result.latency.predicted_fraction <= fraction + 1e-12
    assert result.latency.budget == pytest.approx(budget)
    assert result.latency.before > 0 and result.latency.after > 0
    assert result.allocation.objective == pytest.approx(brute_force(pruner, {"latency": budget},
                                                                    {"latency": lat.cost}), abs=1e-9)
    assert result.to_dict()["latency"]["predicted_fraction"] == result.latency.predicted_fraction
    assert "latency (batch 4" in result.summary()
    # the pruned model has the chosen widths
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:2]] == [keep[u] for u in pruner.curves_]


def test_latency_with_a_macs_budget(pruner):
    pruner.fit_latency(batch_size=2)
    full = pruner.costs_.evaluate()["macs"]
    result = pruner.prune(latency=0.7, macs=0.5, latency_rounds=0)
    keep = dict(result.allocation.keep)
    assert pruner.latency_.cost.evaluate(keep) <= 0.7 * pruner.latency_.full * (1 + 1e-12)
    assert pruner.costs_.macs.evaluate(keep) <= 0.5 * full * (1 + 1e-12)
    costs = {"latency": pruner.latency_.cost, "macs": pruner.costs_.macs}
    best = brute_force(pruner, {"latency": 0.7 * pruner.latency_.full, "macs": 0.5 * full}, costs)
    assert result.allocation.objective == pytest.approx(best, abs=1e-9)


def test_latency_budget_fits_tables_on_demand(pruner):
    assert not hasattr(pruner, "latency_")
    result = pruner.prune(latency=0.9, latency_rounds=0)
    assert pruner.latency_.batch_size == 1 and pruner.latency_.threads == 1
    assert result.latency is not None


def test_macs_prune_reports_latency_once_tables_exist(pruner):
    assert pruner.prune(macs=0.6).latency is None
    pruner.fit_latency(batch_size=2)
    result = pruner.prune(macs=0.6)
    assert result.latency.budget is None
    assert result.latency.predicted == pytest.approx(pruner.latency_.predict(dict(result.allocation.keep)))


def test_bad_latency_requests(pruner):
    with pytest.raises(ValueError, match="`latency` must be a fraction"):
        pruner.prune(latency=1.5)
    with pytest.raises(ValueError, match="needs `allocation='milp'`"):
        pruner.prune(latency=0.5, allocation="uniform")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        pruner.fit_latency(batch_size=0)
    with pytest.raises(ValueError, match="cannot be met"):
        pruner.fit_latency(batch_size=2).prune(latency=1e-4)


def test_refit_drops_stale_tables(pruner):
    pruner.fit_latency(batch_size=2)
    pruner.fit(pruner.model_, pruner.batches_)
    assert not hasattr(pruner, "latency_")


def test_tables_hold_every_option(pruner):
    pruner.fit_latency(batch_size=2)
    for u, curve in pruner.curves_.items():
        assert np.array_equal(pruner.latency_.cost.options[u], curve.keep_counts)
