"""Grouped convolutions (ResNeXt): block-diagonal least squares, channels tied across groups so the
group count stays valid, pruned == masked, costs exact (issue 21)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import orprune
from orprune.examples.coverage_zoo import ResNeXt, randomize_batchnorm
from orprune.layer.problem import LayerProblem
from orprune.layer.tied import block_diagonal, tie_channels
from orprune.network.costs import count_macs_params, network_costs
from orprune.network.graph import find_groups, set_weight_matrix, weight_matrix
from orprune.network.patches import conv_patches
from orprune.network.surgery import PruningPlan, apply_pruning, masked_copy
from tests.layer.instances import random_problem
from tests.models import one_thread  # noqa: F401  (module fixture)


def test_dense_equivalent_of_a_grouped_conv_computes_it_and_round_trips():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)
    x = torch.randn(2, 8, 5, 5)
    w = weight_matrix(conv)
    assert w.shape == (8 * 9, 12)
    out = (conv_patches(conv, x).transpose(1, 2) @ w).transpose(1, 2).reshape(2, 12, 5, 5)
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    other = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)
    set_weight_matrix(other, w)
    torch.testing.assert_close(other.weight, conv.weight)


def test_block_diagonal_least_squares_is_the_sum_of_the_groups():
    rng = np.random.default_rng(0)
    groups, per_in, per_out, g = 3, 2, 2, 2
    X = rng.normal(size=(80, groups * per_in * g))
    Y = rng.normal(size=(80, groups * per_out))
    whole = LayerProblem.from_arrays(X, Y, group_size=g)
    gram, cross = block_diagonal(whole.gram, whole.cross, groups, g)
    prob = LayerProblem(gram, cross, whole.yy, group_size=g, ridge=0.1)
    for bits in range(1, 2 ** (groups * per_in)):
        mask = np.array([(bits >> i) & 1 for i in range(groups * per_in)], dtype=bool)
        expected = 0.0
        for j in range(groups):
            part = LayerProblem.from_arrays(X[:, j * per_in * g:(j + 1) * per_in * g],
                                            Y[:, j * per_out:(j + 1) * per_out], group_size=g, ridge=0.1)
            expected += part.objective(mask[j * per_in:(j + 1) * per_in])
        assert prob.objective(mask) == pytest.approx(expected, rel=1e-9)
        weights, _ = prob.refit(mask)  # zero outside the diagonal blocks
        for j in range(groups):
            rows = slice(j * per_in * g, (j + 1) * per_in * g)
            off = np.delete(weights[rows], np.s_[j * per_out:(j + 1) * per_out], axis=1)
            assert np.abs(off).max() < 1e-12


def test_tied_problem_keeps_a_position_in_every_group():
    prob = random_problem(1, 6, 2, ridge=0.05, correlated=True)
    tied = tie_channels(prob, 3)
    assert (tied.n_channels, tied.group_size) == (2, 6)
    for mask in ([True, False], [False, True], [True, True]):
        full = np.zeros(6, dtype=bool)
        for c in np.flatnonzero(mask):
            full[[c, c + 2, c + 4]] = True
        assert tied.objective(np.array(mask)) == pytest.approx(prob.objective(full), rel=1e-10)


def resnext():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNeXt(width=16, groups=4))
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(3)]


def test_grouped_convs_make_tied_units():
    model, batches = resnext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(model, batches[0][:1])
    assert [e.root for e in graph.excluded] == ["fc"]
    for block in ("block1", "block2"):
        reduce_, grouped = graph[f"{block}.conv1"], graph[f"{block}.conv2"]
        assert (reduce_.n_channels, reduce_.tie) == (4, 4) and (grouped.n_channels, grouped.tie) == (4, 4)
        [consumer] = reduce_.consumers
        assert (consumer.name, consumer.groups, consumer.tie) == (f"{block}.conv2", 4, 4)
        assert reduce_.root_channels([1]) == [1, 5, 9, 13]


def test_random_keeps_of_every_unit_keep_the_group_count_and_cost_what_is_predicted():
    model, batches = resnext()
    x = batches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(model, x[:1])
    rng = np.random.default_rng(2)
    keep = {u.name: np.sort(rng.choice(u.n_channels, int(rng.integers(1, u.n_channels + 1)), replace=False))
            for u in graph.units}
    plan = PruningPlan(keep)
    pruned = apply_pruning(model, graph, plan, x[:1])
    assert pruned.block1.conv2.groups == 4
    assert pruned.block1.conv2.in_channels == 4 * keep["block1.conv1"].size
    assert pruned.block1.conv2.out_channels == 4 * keep["block1.conv2"].size
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_copy(model, graph, plan)(x), rtol=1e-4, atol=1e-5)
    costs = network_costs(model, graph, x[:1]).evaluate({u: int(k.size) for u, k in keep.items()})
    assert (costs["macs"], costs["params"]) == count_macs_params(pruned, x[:1])


def test_resnext_prunes_to_half_macs_and_pruned_equals_masked():
    model, batches = resnext()
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="auto", progress=False, positions_per_image=8).fit(model, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = pruner.prune(macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    assert any(pruner.graph_[u].tie > 1 for u in result.plan.keep)  # a grouped conv lost channels
    x = batches[0]
    with torch.no_grad():
        pruned, masked, original = result.model(x), masked_copy(model, pruner.graph_, result.plan)(x), model(x)
    assert pruned.shape == original.shape
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))
    assert all(m.groups == 4 for n, m in result.model.named_modules() if n.endswith("conv2"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
