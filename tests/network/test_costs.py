"""MACs / params cost models against torch-pruning's counter on actually pruned models."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from orprune.budget.allocation import CostModel
from orprune.network.costs import NetworkCosts, network_costs
from orprune.network.graph import build_dependency_graph, find_groups, unit_group
from tests.models import SMALL, mobilenet_v2, one_thread, resnet18, small_model  # noqa: F401


def quiet_groups(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_groups(model, x, **kwargs)


def pruned_with_tp(model, graph, x, keep, rng):
    """Remove random channels of each unit through torch-pruning's own groups."""
    model = copy.deepcopy(model)
    dg, _ = build_dependency_graph(model, x)
    for unit in graph.units:
        drop = rng.choice(unit.n_channels, unit.n_channels - keep[unit.name], replace=False)
        if drop.size:
            unit_group(dg, model, unit, drop.tolist()).prune()
    return model


def assert_costs_match(model, graph, x, costs, keep, rng):
    ops, params = tp.utils.count_ops_and_params(pruned_with_tp(model, graph, x, keep, rng), x)
    got = costs.evaluate(keep)
    assert got["macs"] == pytest.approx(ops, rel=1e-12)
    assert got["params"] == pytest.approx(params, rel=1e-12)


@pytest.mark.parametrize("name", list(SMALL))
def test_costs_equal_torch_pruning_count(name):
    model, x = small_model(name, batch=3)  # odd batch: tp divides the Linear bias term by it
    graph = quiet_groups(model, x, max_features=1000)
    costs = network_costs(model, graph, x)
    assert isinstance(costs, NetworkCosts) and isinstance(costs.macs, CostModel)
    assert costs.macs.units <= set(graph.names) and costs.macs.nonnegative and costs.params.nonnegative
    ops, params = tp.utils.count_ops_and_params(model, x)
    assert costs.evaluate() == pytest.approx({"macs": ops, "params": params}, rel=1e-12)
    rng = np.random.default_rng(0)
    for low in (1, None):
        keep = {u.name: int(rng.integers(1, u.n_channels + 1)) if low is None else 1 for u in graph.units}
        assert_costs_match(model, graph, x, costs, keep, rng)


def test_vgg_conv_macs_are_bilinear_in_consecutive_units():
    model, x = small_model("vgg11_bn", batch=2)
    graph = quiet_groups(model, x, max_features=1000)
    costs = network_costs(model, graph, x)
    # features.4 (3x3, on the 16x16 map after the first pool) reads features.0's unit and writes its own
    assert costs.macs.bilinear[("features.0", "features.4")] == pytest.approx(9 * 16 * 16)
    assert costs.params.bilinear[("features.0", "features.4")] == pytest.approx(9)
    # the first conv: 3 fixed input channels, 32x32 outputs, plus a bias per output; BN 2 per
    # element; ReLU 1 per element (then features.4's bias, BN and ReLU at 16x16 and the pool)
    assert costs.macs.linear["features.0"] == pytest.approx(32 * 32 * (27 + 1 + 2 + 1) + 32 * 32)
    # hidden Linear layers of the classifier: one unit times the next
    assert costs.macs.bilinear[("classifier.0", "classifier.3")] == pytest.approx(1.0)


class Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.up = nn.Upsample(scale_factor=2)
        self.act = nn.LeakyReLU()
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2)
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.fc = nn.Linear(20, 4)

    def forward(self, x):
        x = self.conv2(self.act(self.up(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_other_counted_modules():
    model, x = Upsampler(), torch.randn(3, 3, 6, 6)
    graph = quiet_groups(model, x)
    assert set(graph.names) == {"conv1", "conv2"}
    costs = network_costs(model, graph, x)
    rng = np.random.default_rng(1)
    for _ in range(3):
        keep = {u.name: int(rng.integers(1, u.n_channels + 1)) for u in graph.units}
        assert_costs_match(model, graph, x, costs, keep, rng)


def test_full_width_costs():
    rng = np.random.default_rng(2)
    for model in (resnet18().eval(), mobilenet_v2().eval()):
        x = torch.randn(1, 3, 32, 32)
        graph = quiet_groups(model, x)
        costs = network_costs(model, graph, x)
        keep = {u.name: max(1, u.n_channels // 2) for u in graph.units}
        assert_costs_match(model, graph, x, costs, keep, rng)


def test_bad_graph():
    model, x = small_model("resnet20")
    with pytest.raises(ValueError, match="`graph`"):
        network_costs(model, {"layer1.0.conv1": 8}, x)
