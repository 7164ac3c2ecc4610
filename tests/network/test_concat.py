"""Concatenation (DenseNet): each producer is a unit, each consumer selects among the unit's columns
with the other producers' columns kept (``formulations/fixed_columns.md``), pruned == masked (issue 21)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import orprune
from orprune.examples.coverage_zoo import DenseNet, randomize_batchnorm
from orprune.network.costs import count_macs_params
from orprune.network.graph import find_groups
from orprune.network.surgery import PruningPlan, apply_pruning, masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)


def densenet() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = randomize_batchnorm(DenseNet())
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(3)]


@pytest.fixture(scope="module")
def fitted():
    model, batches = densenet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches)
    return model, batches, pruner


def test_every_dense_layer_is_a_unit_and_consumers_see_their_columns(fitted):
    _, _, pruner = fitted
    graph = pruner.graph_
    assert [e.root for e in graph.excluded] == ["fc"]  # only the logits
    assert len(graph.units) == 1 + 2 * 3 + 1 + 2 * 3  # stem, 2 convs per layer, transition
    # block1 layer 0's growth channels are inputs 8..11 of layer 1 (12 inputs), of layer 2 (16 inputs)
    readers = {c.name: c for c in graph["block1.0.conv2"].consumers}
    assert readers["block1.1.conv1"].channels == (8, 9, 10, 11)
    assert readers["block1.1.conv1"].n_input_channels == 12
    assert readers["block1.2.conv1"].channels == (8, 9, 10, 11)
    assert readers["trans_conv"].n_input_channels == 20
    # the BatchNorms reading it through the concatenations take its bias
    assert readers["block1.1.conv1"].norm == "block1.1.norm2" and readers["block1.1.conv1"].norms == ()
    assert dict(graph.consumer("block1.0.conv2").norms) == {
        "block1.1.norm1": (8, 9, 10, 11), "block1.2.norm1": (8, 9, 10, 11), "trans_norm": (8, 9, 10, 11)}


def test_unit_problem_is_the_consumers_problems_with_other_columns_kept(fitted):
    _, _, pruner = fitted
    graph, rng = pruner.graph_, np.random.default_rng(0)
    for unit in ("stem", "block1.0.conv2", "block2.1.conv2"):
        prob = pruner.unit_problems_[unit]
        for _ in range(4):
            mask = rng.random(graph[unit].n_channels) < 0.5
            expected = sum(pruner.problems_[c.name].objective(graph.input_mask(c.name, {unit: np.flatnonzero(mask)}))
                           / pruner.problems_[c.name].yy for c in graph[unit].consumers)
            assert prob.objective(mask) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("sequential", [True, False])
def test_densenet_prunes_to_half_macs_and_pruned_equals_masked(fitted, sequential):
    model, batches, pruner = fitted
    if not sequential:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8,
                                    sequential=False).fit(model, batches)
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the cost model predicts torch-pruning's count
        result = pruner.prune(macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    assert sum(k.size < pruner.graph_[u].n_channels for u, k in result.plan.keep.items()) >= 3
    x = batches[0]
    with torch.no_grad():
        pruned, masked, original = result.model(x), masked_copy(model, pruner.graph_, result.plan)(x), model(x)
    assert pruned.shape == original.shape
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_random_keeps_of_every_unit_prune_like_the_masked_model():
    model, batches = densenet()
    x = batches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(model, x[:1])
    rng = np.random.default_rng(3)
    keep = {u.name: np.sort(rng.choice(u.n_channels, int(rng.integers(1, u.n_channels + 1)), replace=False))
            for u in graph.units}
    plan = PruningPlan(keep)
    pruned = apply_pruning(model, graph, plan, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_copy(model, graph, plan)(x), rtol=1e-4, atol=1e-5)
    costs = orprune.network.costs.network_costs(model, graph, x[:1])
    counts = {u: int(k.size) for u, k in keep.items()}
    assert costs.evaluate(counts)["macs"] == count_macs_params(pruned, x[:1])[0]
