"""Channel shuffle (ShuffleNetV2): a stage's channels are followed through its chunks and shuffles; the shuffles
tie each root channel to its partners (the other branch, the stride-1 branches' last convs), the stage splits into
units by where the channels go, and each chunk's balance ties their keep counts into a chain. Consumers read the
right columns, pruned == masked, MACs == counted, for any branch width (``formulations/split_and_shuffle.md``
section 4, issue 21)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import orprune
from orprune.examples.coverage_zoo import ShuffleNetV2, channel_shuffle, randomize_batchnorm
from orprune.network.balance import count_chains
from orprune.network.label_maps import NotFollowed
from orprune.network.surgery import masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)
from tests.network.test_chunk import graph_of, pruned_at_random_keeps


def shufflenet(widths: tuple[int, int] = (16, 32)) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_batchnorm(ShuffleNetV2(widths)).eval(), torch.randn(4, 3, 16, 16)


def reader(graph, consumer: str):
    """The widest unit whose channels ``consumer`` reads."""
    return graph[max(graph.readers(consumer), key=lambda c: c.n_channels).unit]


def test_a_stage_splits_by_where_its_channels_go_and_the_chunk_ties_the_counts():
    model, x = shufflenet()
    graph = graph_of(model, x[:1])
    assert [e.root for e in graph.excluded] == ["fc"]  # every conv is some unit's
    # 8 channels per branch: positions 0-3 of both branch outputs reach the next stage (through the stride-1
    # block's x1, then its shuffle), positions 4-7 go to the stride-1 branch only
    onward, branch = reader(graph, "stage.2.branch2.0"), reader(graph, "stage.1.branch2.0")
    assert onward.name != branch.name and onward.root == branch.root
    assert (onward.n_channels, branch.n_channels, onward.tie, branch.tie) == (4, 4, 1, 1)
    assert {"stage.0.branch1.2", "stage.0.branch2.5"} <= {onward.root, *onward.carried}  # both branch outputs
    assert {"stage.1.branch2.5", "stage.2.branch1.0"} <= set(onward.carried)  # the stride-1 branch, next dw conv
    assert "stage.1.branch2.5" not in branch.carried
    # the stride-1 branch reads the second half: 2 columns per decision (its b1 and b2 channels)
    assert graph.consumer("stage.1.branch2.0").input_channels.shape == (4, 2)
    columns = graph.consumer("stage.2.branch2.0").input_channels  # the next stage reads all 16 channels
    assert columns.shape == (4, 4) and sorted(columns.ravel().tolist()) == list(range(16))
    # the chunk keeps as many channels in each half: the two units keep the same count
    chain = next(c for c in graph.chains if onward.name in c)
    assert chain == {onward.name: (1, 2, 3, 4), branch.name: (1, 2, 3, 4)}


def test_random_balanced_keeps_prune_like_the_masked_model_through_the_shuffles():
    model, x = shufflenet()
    graph = graph_of(model, x[:1])
    onward, branch = reader(graph, "stage.2.branch2.0"), reader(graph, "stage.1.branch2.0")
    for keep, pruned in pruned_at_random_keeps(model, graph, x, seed=3):
        k = keep[onward.name].size
        assert keep[branch.name].size == k
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


def test_a_branch_width_the_position_tie_cannot_serve_is_balanced_exactly():
    """5 channels per branch: position 2 straddles the chunk's halves (its b1 channel in x1, its b2 channel in x2),
    a unit of its own kept whole; positions 0-1 and 3-4 keep as many."""
    model, x = shufflenet((10, 20))
    graph = graph_of(model, x[:1])
    assert [e.root for e in graph.excluded] == ["fc"]
    onward, branch = reader(graph, "stage.2.branch2.0"), reader(graph, "stage.1.branch2.0")
    straddle = [u for u in graph.units if u.root == onward.root and u.name not in (onward.name, branch.name)]
    assert [u.n_channels for u in (onward, branch, *straddle)] == [2, 2, 1]
    chain = next(c for c in graph.chains if onward.name in c)
    assert chain == {onward.name: (1, 2), branch.name: (1, 2)}  # the straddler balances itself: in no equation
    for _ in pruned_at_random_keeps(model, graph, x, seed=1):
        pass


@pytest.mark.parametrize("allocation", ["milp", "uniform"])
def test_pruner_meets_the_budget_through_the_shuffles_and_prunes_like_the_masked_model(allocation):
    model, x = shufflenet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=4).fit(model, [x])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the cost model predicts the pruned model's count
        result = pruner.prune(macs=0.4, allocation=allocation)
    assert result.macs_after <= 0.4 * result.macs_before
    for chain in pruner.graph_.chains:  # the balance held: every unit of a chain at the same step
        steps = {chain[u].index(result.plan.keep[u].size) for u in chain if len(chain[u]) > 1}
        assert len(steps) == 1
    with torch.no_grad():
        masked = masked_copy(model, pruner.graph_, result.plan)(x)
        torch.testing.assert_close(result.model(x), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))
    assert result.model(x).shape == model(x).shape


def test_user_ties_may_not_name_balanced_units():
    model, x = shufflenet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=4).fit(model, [x])
    onward = reader(pruner.graph_, "stage.2.branch2.0")
    with pytest.raises(ValueError, match="balance already ties"):
        pruner.prune(macs=0.5, ties=[[onward.name, "conv5.0"]])


def test_count_chains_solves_the_nested_balance_of_a_deep_stage():
    """A 58-channel branch with three stride-1 blocks (torchvision's ShuffleNetV2 x1.0, stage 2): levels of 29, 14, 6
    and 7 positions and two one-position straddlers (S7, S14), with the three chunks' equations (channels in part 1
    minus part 0, per kept decision)."""
    sizes = {"L1": 29, "M": 14, "L3": 6, "L4": 7, "S7": 1, "S14": 1}
    equations = [{"L1": 2, "M": -2, "L3": -2, "L4": -2, "S7": -2, "S14": -2},
                 {"M": 4, "L3": -4, "L4": -4, "S7": -4},
                 {"L3": 8, "L4": -8, "S7": 4, "S14": 4}]
    (chain,) = count_chains(sizes, equations)
    assert chain["L3"] == (1, 2, 3, 4, 5, 6) and chain["L4"] == (2, 3, 4, 5, 6, 7)
    assert chain["M"] == tuple(range(4, 15, 2)) and chain["L1"] == tuple(range(9, 30, 4))
    assert chain["S7"] == chain["S14"] == (1,)
    for t in range(6):  # every step meets every equation
        assert all(sum(a * chain[u][min(t, len(chain[u]) - 1)] for u, a in eq.items()) == 0 for eq in equations)


def test_count_chains_refuses_what_is_not_one_chain():
    with pytest.raises(NotFollowed, match="2 free keep counts"):
        count_chains({"a": 4, "b": 4, "c": 4}, [{"a": 1, "b": 1, "c": -2}])
    with pytest.raises(NotFollowed, match="shrinks"):
        count_chains({"a": 4, "b": 4}, [{"a": 1, "b": 1}])  # a + b = 0: one grows as the other shrinks
    assert count_chains({"a": 3, "b": 6}, [{"a": 2, "b": -1}]) == [{"a": (1, 2, 3), "b": (2, 4, 6)}]


def test_ucp_scores_every_unit_of_a_stage_from_the_convs_writing_it():
    """The stage's units share their producers (both branch outputs write every unit's channels): each unit's
    scores come from its own channels of those convs."""
    from orprune.ucp import se_importance

    model, _ = shufflenet()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = graph_of(model, x[:1])
        stage = [u.name for u in graph.units if u.root == reader(graph, "stage.2.branch2.0").root]
        result = se_importance(model, x, y, graph=graph, epochs=1, batch_size=8, freeze=True, units=stage)
    for name in stage:
        scores = result.scores[name]
        assert scores.shape == (graph[name].n_channels,) and np.all(np.isfinite(scores)) and np.all(scores > 0)


def test_deep_stages_build_and_prune_like_the_masked_model():
    """Three and two stride-1 blocks in a row, which torch-pruning 1.6 cannot build a graph for (a
    ``ZeroDivisionError`` in its reshape index mapping): the graph is built without those maps and every stage is
    followed by orprune; 8 channels per branch and three blocks leave one count (groups 4, 2, 1, 1: kept whole),
    16 and two blocks give counts (k, k, 2k) for k = 1..4."""
    torch.manual_seed(0)
    model, x = randomize_batchnorm(ShuffleNetV2((16, 32), depths=(3, 2))).eval(), torch.randn(4, 3, 16, 16)
    graph = graph_of(model, x[:1])
    assert [e.root for e in graph.excluded] == ["fc"]
    chains = sorted(graph.chains, key=len)
    assert sorted(len(c) for c in chains) == [3, 4]
    assert sorted(chains[0].values()) == [(1, 2, 3, 4), (1, 2, 3, 4), (2, 4, 6, 8)]
    assert sorted(chains[1].values()) == [(1,), (1,), (2,), (4,)]
    for _ in pruned_at_random_keeps(model, graph, x, seed=2):
        pass


def test_torchvision_x1_stage_balances_as_worked_by_hand():
    """torchvision's ShuffleNetV2 x1.0 first stage (116 channels, 58 per branch, three stride-1 blocks): the groups
    and chain of ``test_count_chains_solves_the_nested_balance_of_a_deep_stage``, read from the model."""
    torch.manual_seed(0)
    model = ShuffleNetV2((116,), depths=(3,)).eval()
    graph = graph_of(model, torch.randn(1, 3, 16, 16))
    (chain,) = graph.chains
    assert sorted((graph[u].n_channels, options) for u, options in chain.items()) == [
        (1, (1,)), (1, (1,)), (6, (1, 2, 3, 4, 5, 6)), (7, (2, 3, 4, 5, 6, 7)), (14, tuple(range(4, 15, 2))),
        (29, tuple(range(9, 30, 4)))]


class ShuffleHead(nn.Module):
    """A ShuffleNetV2 stage read by a Linear (no conv5): through pooling and a flatten, straight through a flatten of
    its 2x2 map (4 features per channel), or through a mean over the positions."""

    def __init__(self, head: str):
        super().__init__()
        self.head = head
        self.body = ShuffleNetV2((16,), depths=(1,))
        self.fc = nn.Linear(16 * (4 if head == "flatten" else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body.stage(self.body.stem(x))
        if self.head == "mean":
            return self.fc(x.mean((2, 3)))
        if self.head == "pool":
            x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("head", ["pool", "flatten", "mean"])
def test_a_linear_reading_a_stage_through_a_flatten_is_a_consumer(head):
    torch.manual_seed(0)
    model, x = randomize_batchnorm(ShuffleHead(head)).eval(), torch.randn(4, 3, 4, 4)
    graph = graph_of(model, x[:1])
    assert [e.root for e in graph.excluded] == ["fc"]  # only the logits
    fc = graph.consumer("fc")
    assert (fc.kind, fc.group_size) == ("linear", 4 if head == "flatten" else 1)
    for _ in pruned_at_random_keeps(model, graph, x, seed=4):  # pruned == masked, MACs == counted
        pass


def test_pruner_refits_a_linear_reading_a_stage():
    torch.manual_seed(0)
    model, x = randomize_batchnorm(ShuffleHead("flatten")).eval(), torch.randn(16, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False).fit(model, [x])
        result = pruner.prune(macs=0.6)
    assert result.macs_after <= 0.6 * result.macs_before
    assert result.model.fc.in_features < model.fc.in_features  # the stage was narrowed, the Linear with it
    with torch.no_grad():
        masked = masked_copy(model, pruner.graph_, result.plan)(x)
        torch.testing.assert_close(result.model(x), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))


class LiteralSplitBlock(nn.Module):
    """A ShuffleNetV2 stride-1 block that splits with literal sizes (``torch.split(x, [h, h])``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.branch2 = block.branch2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[1] // 2
        x1, x2 = torch.split(x, [h, h], dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), 1), 2)


def test_a_literal_split_leaves_its_stage_alone_once_with_the_reason():
    torch.manual_seed(0)
    model = ShuffleNetV2((16, 32), depths=(2, 1))
    for i in (1, 2, 4):
        model.stage[i] = LiteralSplitBlock(model.stage[i])
    model, x = randomize_batchnorm(model).eval(), torch.randn(4, 3, 16, 16)
    graph = graph_of(model, x[:1])
    roots = [e.root for e in graph.excluded]
    assert len(roots) == len(set(roots))  # each producer once, though several torch-pruning groups hold it
    assert "literal sizes [8, 8]" in {e.root: e.reason for e in graph.excluded}["stage.0.branch1.2"]
    assert {"stem.0", "stage.1.branch2.0", "conv5.0"} <= set(graph.names)  # the rest is still pruned
    for _ in pruned_at_random_keeps(model, graph, x, seed=5, rounds=1):
        pass
