"""float32 batch products (summed in float64) agree with float64 statistics within the stated tolerance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import orprune
from orprune.layer.problem import StatisticsAccumulator
from orprune.network.calibration import collect_statistics
from orprune.network.graph import find_groups
from tests.models import one_thread, small_model  # noqa: F401  (module fixture)

RTOL = StatisticsAccumulator.FLOAT32_RTOL


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(float).tiny))


def test_accumulator_float32_agrees_with_float64():
    gen = torch.Generator().manual_seed(0)
    acc64, acc32 = StatisticsAccumulator(50, 7), StatisticsAccumulator(50, 7, float32=True)
    for _ in range(5):
        X = torch.relu(torch.randn(400, 50, generator=gen)) + 0.3 * torch.randn(400, 1, generator=gen)
        Y = X @ torch.randn(50, 7, generator=gen) + torch.randn(400, 7, generator=gen)
        acc64.update(X, Y)
        acc32.update(X, Y)
    for center in (False, True):
        for a, b in zip(acc32.statistics(center=center), acc64.statistics(center=center)):
            assert _rel(np.asarray(a), np.asarray(b)) < RTOL
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in acc32.statistics()[:2])


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_network_statistics_and_refits_agree(name):
    model, example = small_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(model, example[:1])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, *example.shape[1:], generator=gen) for _ in range(2)]
    s64 = collect_statistics(model, graph.consumers, batches, positions_per_image=16, progress=False)
    s32 = collect_statistics(model, graph.consumers, batches, positions_per_image=16, progress=False, float32=True)
    for consumer in s64:
        g64, b64, yy64 = s64[consumer].statistics(center=True)
        g32, b32, yy32 = s32[consumer].statistics(center=True)
        assert _rel(g32, g64) < RTOL and _rel(b32, b64) < RTOL and abs(yy32 - yy64) <= RTOL * yy64
        # the float64 solve on float32 statistics: the refit error agrees to the same order
        p64 = orprune.LayerProblem(g64, b64, yy64, ridge=1e-3 * np.mean(np.diag(g64)))
        p32 = orprune.LayerProblem(g32, b32, yy32, ridge=1e-3 * np.mean(np.diag(g64)))
        mask = np.arange(p64.n_channels) % 2 == 0
        assert abs(p32.objective(mask) - p64.objective(mask)) <= 10 * RTOL * yy64


def test_pruner_float32_statistics_give_the_same_problems():
    model, example = small_model("resnet20")
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, *example.shape[1:], generator=gen) for _ in range(2)]
    pruners = []
    for float32 in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8, float32_statistics=float32)
            pruners.append(pruner.fit(model, calibration))
    for name, p64 in pruners[0].problems_.items():
        p32 = pruners[1].problems_[name]
        assert _rel(p32.gram, p64.gram) < RTOL and _rel(p32.cross, p64.cross) < RTOL
    # masks may differ where greedy meets near-ties; the pruned model meets the budget either way
    result = pruners[1].prune(macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before * (1 + 1e-9)
    with pytest.raises(ValueError, match="`float32_statistics`"):
        orprune.Pruner(float32_statistics="yes").fit(model, calibration)
