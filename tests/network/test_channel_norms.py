"""LayerNorm / GroupNorm over a unit's channels (issue 21): sliced with the unit, the masked reference
normalises over the kept channels only, physically pruned == masked, costs equal torch-pruning's count.
``formulations/channel_norms.md``."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

import orprune
from orprune.examples.coverage_zoo import LayerNorm2d, NormNet
from orprune.network._kept_norms import KeptChannelsNorm, mask_norm
from orprune.network.costs import network_costs
from orprune.network.graph import find_groups
from orprune.network.surgery import ConsumerUpdate, PruningPlan, _masked_weights, apply_pruning, masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)


def norm_net():
    torch.manual_seed(0)
    model = NormNet().eval()
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(6, 3, 6, 6, generator=gen) for _ in range(3)]


def quiet_groups(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return find_groups(model, x)


@pytest.mark.parametrize("kind", ["layernorm", "layernorm2d", "groupnorm"])
def test_kept_channels_norm_is_the_pruned_norm(kind):
    torch.manual_seed(0)
    if kind == "layernorm":
        norm, x, dim, kept = nn.LayerNorm(6), torch.randn(2, 5, 6), -1, [0, 2, 3, 5]
    elif kind == "layernorm2d":
        norm, x, dim, kept = LayerNorm2d(6), torch.randn(2, 6, 3, 4), 1, [1, 2, 4]
    else:
        norm, x, dim, kept = nn.GroupNorm(3, 6), torch.randn(2, 6, 3, 3), 1, [0, 3, 5]  # one per group
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    pruned = copy.deepcopy(norm)
    dropped = sorted(set(range(6)) - set(kept))
    (tp.prune_groupnorm_out_channels if kind == "groupnorm" else tp.prune_layernorm_out_channels)(pruned, dropped)
    masked = copy.deepcopy(norm)
    mask_norm(masked, kept)
    out = masked(x)
    expected = pruned(x.index_select(dim, torch.tensor(kept)))
    torch.testing.assert_close(out.index_select(dim, torch.tensor(kept)), expected)
    assert out.index_select(dim, torch.tensor(dropped)).abs().max() == 0
    # normalising over every channel is a different function: the mask is what makes masked == pruned
    assert (norm(x).index_select(dim, torch.tensor(kept)) - expected).abs().max() > 1e-2


def test_group_norm_must_lose_channels_from_every_group_alike():
    with pytest.raises(ValueError, match="every group"):
        KeptChannelsNorm(nn.GroupNorm(2, 6), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="kept"):
        KeptChannelsNorm(nn.LayerNorm(4), [])


def test_norms_over_the_channels_are_carried_and_tie_group_norms():
    model, batches = norm_net()
    graph = quiet_groups(model, batches[0][:1])
    assert set(graph.names) >= {"conv1", "conv2", "fc0", "fc1"}
    conv1 = graph["conv1"]
    assert conv1.tie == 2 and conv1.n_channels == 4  # GroupNorm(2, 8): a position in both groups
    assert [n for n, _ in conv1.norms] == ["gn"] and conv1.norms[0][1] == tuple(range(8))
    assert [n for n, _ in graph["conv2"].norms] == ["ln2d"]
    assert [n for n, _ in graph["fc0"].norms] == ["ln"] and "ln" in graph["fc0"].carried


def test_layer_norm_over_more_than_the_channels_is_excluded():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.ln, self.conv2 = nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 4, 4]), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.conv2(self.ln(self.conv1(x)))

    graph = quiet_groups(Net(), torch.randn(1, 3, 6, 6))
    assert "conv1" not in graph.names
    assert any("not over the channels alone" in e.reason for e in graph.excluded)


def random_plan(graph, rng, weights=True):
    keep = {u.name: np.sort(rng.choice(u.n_channels, max(1, u.n_channels // 2), replace=False)) for u in graph.units}
    updates = {}
    for c in graph.consumers:
        if weights and c.name not in updates:
            updates[c.name] = ConsumerUpdate(weight=rng.normal(size=(c.n_features, c.n_outputs)) * 0.3,
                                             bias=rng.normal(size=c.n_outputs) * 0.1)
    return PruningPlan(keep, updates)


def test_pruned_equals_masked_through_layer_and_group_norms():
    model, batches = norm_net()
    state = copy.deepcopy(model.state_dict())
    x = batches[0]
    graph = quiet_groups(model, x[:1])
    plan = random_plan(graph, np.random.default_rng(0))
    pruned = apply_pruning(model, graph, plan, x[:1])
    assert pruned.gn.num_groups == 2 and pruned.gn.num_channels == 4
    assert pruned.ln.normalized_shape == (5,) and pruned.ln2d.weight.shape == (6,)
    assert not pruned.ln._forward_hooks  # the pruned model is plain: no masking hooks
    with torch.no_grad():
        out, masked, zeros_only = pruned(x), masked_copy(model, graph, plan)(x), _masked_weights(model, graph, plan)(x)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5 * float(masked.abs().max()))
    # zeroing the consumers' weights alone is not the pruned function: the norms' statistics change
    assert (out - zeros_only).abs().max() > 1e-2 * masked.abs().max()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_costs_of_norms_equal_torch_pruning_count():
    model, batches = norm_net()
    x = batches[0][:3]
    graph = quiet_groups(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no module counted as a constant although pruned
        costs = network_costs(model, graph, x)
    rng = np.random.default_rng(1)
    plan = random_plan(graph, rng, weights=False)
    pruned = apply_pruning(model, graph, plan, x[:1])
    ops, params = tp.utils.count_ops_and_params(pruned, x)
    got = costs.evaluate({u: len(k) for u, k in plan.keep.items()})
    assert got["macs"] == pytest.approx(ops, rel=1e-12) and got["params"] == pytest.approx(params, rel=1e-12)


def test_network_with_norms_prunes_to_half_macs_and_pruned_equals_masked():
    model, batches = norm_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches)
    result = pruner.prune(macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    assert result.plan.keep["fc0"].size < 10  # the LayerNorm's channels are pruned
    x = batches[0]
    with torch.no_grad():
        pruned, masked = result.model(x), masked_copy(model, pruner.graph_, result.plan)(x)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))


def test_an_ambiguous_channel_dimension_is_an_error_not_a_guess():
    norm = LayerNorm2d(6)  # its own forward: the channel dimension is found from the input's shape
    masked = copy.deepcopy(norm)
    mask_norm(masked, [0, 2, 4])
    assert masked(torch.randn(2, 6, 3, 4)).shape == (2, 6, 3, 4)
    with pytest.raises(ValueError, match="which dimension"):
        masked(torch.randn(2, 6, 6, 6))


def test_group_norm_and_grouped_conv_with_different_group_counts_are_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
            self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.conv3(self.conv2(self.gn(self.conv1(x))))

    graph = quiet_groups(Net(), torch.randn(1, 3, 6, 6))
    assert "conv1" not in graph.names
    assert any("different group counts [2, 4]" in e.reason for e in graph.excluded)
