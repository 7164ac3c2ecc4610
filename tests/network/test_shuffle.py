"""Channel shuffle (ShuffleNetV2): a stage is one unit whose decision ``c`` ties, through the chunks and shuffles,
position ``c`` of both branch outputs of the stride-2 block and the stride-1 branches' last convs; consumers read
the right columns, pruned == masked, MACs == counted, and widths the ties cannot serve are left alone with the
reason (``formulations/split_and_shuffle.md`` section 2.1, issue 21)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

import orprune
from orprune.examples.coverage_zoo import ShuffleNetV2, channel_shuffle, randomize_batchnorm
from orprune.network.surgery import masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)
from tests.network.test_chunk import graph_of, pruned_at_random_keeps, reasons


def shufflenet(widths: tuple[int, int] = (16, 32)) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_batchnorm(ShuffleNetV2(widths)).eval(), torch.randn(4, 3, 16, 16)


def test_a_stage_is_one_unit_through_its_chunk_and_shuffles():
    model, x = shufflenet()
    graph = graph_of(model, x[:1])
    assert [e.root for e in graph.excluded] == ["fc"]  # every conv is some unit's
    first = next(u for u in graph.units if "stage.0.branch1.2" in (u.root, *u.carried))
    # 8 channels per branch and one stride-1 block: the chunk ties position i to i + 4, so 4 decisions of 2
    assert (first.n_channels, first.tie) == (4, 2)
    modules = {first.root, *first.carried}
    assert {"stage.0.branch1.2", "stage.0.branch2.5", "stage.1.branch2.5"} <= modules  # the convs writing the stage
    assert "stage.2.branch1.0" in modules  # the next stage's depthwise conv, sliced with the channels it reads
    readers = {c.name: c for c in first.consumers}
    assert set(readers) == {"stage.1.branch2.0", "stage.2.branch1.2", "stage.2.branch2.0"}
    # the stride-1 branch reads the second half of the stage tensor: 2 of its 8 inputs per decision
    assert readers["stage.1.branch2.0"].input_channels.shape == (4, 2)
    # the next stage reads all 16 channels: 4 per decision, each decision's channels in both halves
    columns = readers["stage.2.branch2.0"].input_channels
    assert columns.shape == (4, 4) and sorted(columns.ravel().tolist()) == list(range(16))
    labels = dict(first.traced)
    for conv in ("stage.0.branch1.2", "stage.0.branch2.5", "stage.1.branch2.5"):
        assert sorted(labels[conv]) == sorted(range(8))  # each stands for every root channel once


def test_random_keeps_prune_like_the_masked_model_through_the_shuffles():
    model, x = shufflenet()
    graph = graph_of(model, x[:1])
    for keep, pruned in pruned_at_random_keeps(model, graph, x, seed=3):
        first = next(u for u in graph.units if "stage.0.branch1.2" in (u.root, *u.carried))
        k = keep[first.name].size
        assert pruned.stage[0].branch1[2].out_channels == pruned.stage[0].branch2[5].out_channels == 2 * k
        assert pruned.stage[1].branch2[0].in_channels == 2 * k  # the chunk still halves the stage tensor


def test_the_position_tie_serves_the_shuffle_and_other_kept_sets_can_break_it():
    """Pruned == masked through a shuffle when both groups keep the same positions; when group 0 keeps its first
    half and group 1 its second, the pruned shuffle interleaves them in another order than the masked one."""
    x = torch.randn(1, 8, 1, 1)
    full = channel_shuffle(x, 2)
    destination = np.arange(8).reshape(2, 4).T.ravel().argsort()  # input channel j * 4 + i goes to i * 2 + j
    for kept, equal in (([0, 2, 4, 6], True), ([1, 3, 5, 7], True), ([0, 1, 6, 7], False)):
        assert torch.equal(channel_shuffle(x[:, kept], 2), full[:, sorted(destination[kept])]) == equal


def test_widths_the_ties_cannot_serve_are_left_alone_with_the_reason():
    model, x = shufflenet((10, 20))  # 5 channels per branch: the chunk of 10 cannot tie positions pairwise
    graph = graph_of(model, x[:1])
    why = reasons(graph)
    stage = [r for root, r in why.items() if root.startswith("stage.") and "tie" in r]
    assert stage, why
    assert "stage.0.branch2.0" in graph and "conv5.0" in graph  # the rest is still pruned


def test_pruner_meets_the_budget_through_the_shuffles_and_prunes_like_the_masked_model():
    model, x = shufflenet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=4).fit(model, [x])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the cost model predicts the pruned model's count
        result = pruner.prune(macs=0.4)
    assert result.macs_after <= 0.4 * result.macs_before
    with torch.no_grad():
        masked = masked_copy(model, pruner.graph_, result.plan)(x)
        torch.testing.assert_close(result.model(x), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))
    assert result.model(x).shape == model(x).shape
