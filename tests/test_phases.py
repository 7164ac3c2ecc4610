"""Phase times and peak memory in PruneResult: every phase reported once, times adding up, nesting not counted twice."""

from __future__ import annotations

import dataclasses
import time

import pytest

from orprune._phases import format_phases, peak_memory_mb, timed_phase
from orprune.network.cost_model import CostModel
from tests.models import fitted_greedy_pruner, one_thread  # noqa: F401  (module fixture)


@pytest.fixture(scope="module")
def fitted():
    return fitted_greedy_pruner("resnet20")[2]


def test_nested_phase_is_taken_out_of_its_parent():
    record = []
    with timed_phase(record, "outer"):
        time.sleep(0.05)
        with timed_phase(record, "inner"):
            time.sleep(0.1)
    inner, outer = record
    assert (inner.name, outer.name) == ("inner", "outer")
    assert inner.wall >= 0.1 and 0.05 <= outer.wall < 0.1  # outer excludes the inner 0.1 s
    assert "outer" in format_phases(record) and "inner" in format_phases(record)


def test_phase_is_recorded_when_the_body_raises():
    record = []
    with pytest.raises(KeyError), timed_phase(record, "failing"):
        raise KeyError("x")
    assert [p.name for p in record] == ["failing"]


def test_peak_memory_is_positive_where_reported():
    peak = peak_memory_mb()
    assert peak is None or peak > 1.0  # a Python process with torch holds far more than 1 MB


def test_prune_result_reports_fit_and_prune_phases(fitted):
    start = time.perf_counter()
    result = fitted.prune(macs=0.6)
    elapsed = time.perf_counter() - start
    names = [p.name for p in result.phases]
    assert names[:3] == ["trace", "calibration", "curves"]
    assert {"allocation", "refit", "surgery"} <= set(names[3:])
    assert all(p.wall >= 0 and p.cpu >= 0 for p in result.phases)
    prune_phases = result.phases[len(fitted.fit_phases_):]
    # the prune phases partition (part of) the prune call's time: never more than it took
    assert sum(p.wall for p in prune_phases) <= elapsed + 1e-3
    assert sum(p.wall for p in prune_phases) <= result.prune_time + 1e-3
    assert "time: trace" in result.summary()
    assert [d["name"] for d in result.to_dict()["phases"]] == names


def test_self_check_rounds_each_report_their_refit(fitted):
    """When the cost model under-prices, prune re-solves and rebuilds: each build's refit is a phase."""
    true_costs = fitted.costs_
    macs = true_costs.macs
    fitted.costs_ = dataclasses.replace(true_costs, macs=CostModel(
        constant=macs.constant, linear={u: 0.9 * a for u, a in macs.linear.items()},
        bilinear={k: 0.9 * b for k, b in macs.bilinear.items()}))
    try:
        result = fitted.prune(macs=0.5)
    finally:
        fitted.costs_ = true_costs
    names = [p.name for p in result.phases]
    assert names.count("refit") >= 2 and names.count("refit") == names.count("allocation")
