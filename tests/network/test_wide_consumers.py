"""A network whose classifier reads a flattened feature map wider than ``max_features`` (VGG's 512 x 7 x 7): the
unit feeding it is pruned, its consumer's refit is the exact least squares, and pruned == masked."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import orprune
from orprune.layer.wide import WideProblem
from orprune.network.calibration import collect_statistics
from orprune.network.graph import find_groups
from orprune.network.surgery import masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)


class WideHead(nn.Module):
    """Two conv + BN + ReLU layers, a 4x4 map flattened into a Linear (16 channels x 16 = 256 columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Linear(256, 12), nn.ReLU(), nn.Linear(12, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def model_and_batches(n_batches: int = 4, batch: int = 16):
    torch.manual_seed(0)
    model = WideHead()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(n_batches)]
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    return model.eval(), batches


def test_the_unit_feeding_a_wide_classifier_is_a_unit():
    model, batches = model_and_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = find_groups(model, batches[0], max_features=64)
    (consumer,) = graph["features.3"].consumers
    assert consumer.name == "classifier.0" and consumer.group_size == 16 and consumer.sketch == 4 and consumer.wide
    assert "features.3" not in {e.root for e in graph.excluded}
    stats = collect_statistics(model, [consumer], batches, progress=False)
    assert type(stats["classifier.0"]).__name__ == "WideAccumulator" and stats["classifier.0"].exact


@pytest.mark.parametrize("sequential", [False, True])
def test_wide_unit_is_pruned_refitted_exactly_and_pruned_equals_masked(sequential):
    model, batches = model_and_batches()
    pruner = orprune.Pruner(max_features=64, solver="greedy", sequential=sequential, polish_time=None,
                            progress=False).fit(model, batches)
    problem = pruner.problems_["classifier.0"]
    assert isinstance(problem, WideProblem) and problem.exact and problem.group_size == 4
    assert pruner.unit_problems_["features.3"].n_features == 16 * 4  # the curves solve the compressed problem
    result = pruner.prune(macs=0.45)
    assert result.macs_after <= 0.45 * result.macs_before  # budget met
    report = {r.unit: r for r in result.report}
    assert report["features.3"].channels_after < 16  # the unit is pruned
    kept = result.plan.keep["features.3"]

    # the wide consumer's refit is the exact least squares over all 16 x 16 columns of the kept channels
    if not sequential:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact_graph = find_groups(model, batches[0], max_features=10_000)
        (consumer,) = exact_graph["features.3"].consumers
        acc = collect_statistics(pruner.model_, [consumer], batches, progress=False)["classifier.0"]
        exact = acc.to_problem(group_size=16, ridge=problem.ridge, center=True)
        mask = np.zeros(16, dtype=bool)
        mask[kept] = True
        weights, value = exact.refit(mask)
        assert problem.exact_objective(mask) == pytest.approx(value, rel=1e-7)
        np.testing.assert_allclose(result.plan.updates["classifier.0"].weight, weights, rtol=1e-6,
                                   atol=1e-8 * np.abs(weights).max())

    # physically pruned == masked, and the smaller classifier really is smaller
    masked = masked_copy(pruner.model_, pruner.graph_, result.plan)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pruned_out, masked_out = result.model(x), masked(x)
    assert torch.allclose(pruned_out, masked_out, atol=1e-5)
    assert result.model.classifier[0].in_features == kept.size * 16
    assert model.classifier[0].in_features == 256  # the input model is unchanged
