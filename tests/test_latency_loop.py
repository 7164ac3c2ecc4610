"""Pruner.prune(latency=) with measured rounds: the allocation is re-solved until the *measured* pruned model
meets the budget, when the tables are biased (as measured on real machines: proportional spreading of the
untabulated time under-predicts small widths).

Both clocks are mocked and deterministic: the tables' cells (``fastest_time``) and the whole-model
measurement (``call_times``), which adds a constant overhead the tables spread in proportion.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import orprune._latency_loop as latency_loop_module
import orprune.network.latency as latency_module
from orprune._latency_loop import next_table_fraction
from orprune.pipeline import Pruner
from tests.models import TinyNet, one_thread  # noqa: F401  (one_thread: module fixture)

OVERHEAD = 0.004  # seconds the whole model spends outside its convs, whatever the widths


def cell_time(module: nn.Module) -> float:
    return 1e-3 * module.in_channels * module.out_channels


def fake_fastest_time(module: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    if isinstance(module, nn.Conv2d):
        return cell_time(module)
    return measured_time(module.model)  # the whole model, when the tables are made


def measured_time(model: nn.Module) -> float:
    return OVERHEAD + sum(cell_time(m) for m in model.modules() if isinstance(m, nn.Conv2d))


def fake_call_times(models, x, repeats, warmup=3, statistic="min"):
    return [measured_time(m) for m in models]


@pytest.fixture
def pruner(monkeypatch, tmp_path):
    monkeypatch.setattr(latency_module, "fastest_time", fake_fastest_time)
    monkeypatch.setattr(latency_loop_module, "call_times", fake_call_times)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, 2, 6, 6, generator=gen) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Pruner(solver="greedy", progress=False).fit(TinyNet().eval(), calibration).fit_latency(batch_size=2)


@pytest.mark.parametrize("fraction", [0.35, 0.45, 0.5])
def test_measured_rounds_meet_the_budget_the_tables_alone_miss(pruner, fraction):
    tables_only = pruner.prune(latency=fraction, latency_rounds=0)
    # the biased tables: their prediction meets the budget, the measurement does not (else nothing to test)
    assert tables_only.latency.predicted_fraction <= fraction + 1e-12
    assert tables_only.latency.measured_fraction > fraction
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = pruner.prune(latency=fraction, latency_rounds=4)
    rounds = result.latency.rounds
    assert 2 <= len(rounds) <= 5
    assert rounds[0].table_fraction == fraction and rounds[0].measured_fraction == tables_only.latency.measured_fraction
    assert result.latency.measured_fraction <= fraction
    assert result.latency.measured_fraction == pytest.approx(measured_time(result.model) / measured_time(pruner.model_))
    assert result.latency.budget == pytest.approx(fraction * pruner.latency_.full)
    # the least error among the rounds that met the budget, and never better than the tables' own choice
    met = [r for r in rounds if r.measured_fraction <= fraction]
    assert result.allocation.objective == pytest.approx(min(r.objective for r in met))
    assert result.allocation.objective >= tables_only.allocation.objective - 1e-12
    assert result.to_dict()["latency"]["rounds"][0]["table_fraction"] == fraction
    assert "measured round(s)" in result.summary()


def test_one_round_stops_when_the_tables_are_right(pruner, monkeypatch):
    # measurements that agree with the tables' proportional model: the first allocation is accepted
    scale = pruner.latency_.full / pruner.latency_.tabulated
    monkeypatch.setattr(latency_loop_module, "call_times", lambda models, x, repeats, warmup=3, statistic="min": [
        scale * (measured_time(m) - OVERHEAD) for m in models])
    result = pruner.prune(latency=0.6, latency_rounds=3, latency_tolerance=0.99)
    assert len(result.latency.rounds) == 1
    assert result.latency.measured_fraction <= 0.6


def test_unmet_budget_warns_and_returns_the_fastest(pruner, monkeypatch):
    # the overhead alone is above the budget: no allocation can meet it when measured
    monkeypatch.setattr(latency_loop_module, "call_times", lambda models, x, repeats, warmup=3, statistic="min": [
        1.0 + measured_time(m) for m in models])
    with pytest.warns(RuntimeWarning, match="above the budget"):
        result = pruner.prune(latency=0.5, latency_rounds=2)
    fastest = min(r.measured_fraction for r in result.latency.rounds)
    assert result.latency.measured_fraction == fastest


def test_secant_step():
    # first round: the measurement in proportion, 0.5 * 0.5 / 0.6
    assert next_table_fraction([(0.5, 0.6)], 0.5) == pytest.approx(0.5 * 0.5 / 0.6)
    # two rounds: the secant through them (slope 0.8) reaches 0.5 at predicted 0.375
    assert next_table_fraction([(0.5, 0.6), (0.4, 0.52)], 0.5) == pytest.approx(0.375)
    # a noisy, inverted secant falls back to the proportional step from the last point
    assert next_table_fraction([(0.5, 0.6), (0.4, 0.65)], 0.5) == pytest.approx(0.4 * 0.5 / 0.65)


def test_bad_loop_arguments(pruner):
    with pytest.raises(ValueError, match="`latency_rounds` must be a non-negative integer"):
        pruner.prune(latency=0.5, latency_rounds=-1)
    with pytest.raises(ValueError, match="`latency_tolerance` must be a number in"):
        pruner.prune(latency=0.5, latency_tolerance=1.0)
    with pytest.raises(ValueError, match="cannot be met"):
        pruner.prune(latency=1e-4)
