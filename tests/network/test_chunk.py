"""Chunk (YOLOv8's C2f): a producer's channels through ``x.chunk(2, 1)`` are one unit whose decision ``c`` ties
position ``c`` of both parts; consumers read the right columns, pruned == masked, the chunk stays valid and a split
with literal sizes is still left alone (``formulations/split_and_shuffle.md``, issue 21)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orprune._pipeline_steps import unit_part
from orprune.examples.coverage_zoo import randomize_batchnorm
from orprune.examples.csp_zoo import C2fNet
from orprune.layer.problem import LayerProblem
from orprune.network.costs import count_macs_params, network_costs
from orprune.network.graph import find_groups
from orprune.network.surgery import PruningPlan, apply_pruning, masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)


def c2f(shortcut: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_batchnorm(C2fNet(shortcut=shortcut)).eval(), torch.randn(4, 3, 16, 16)


def graph_of(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return find_groups(model, x)


def reasons(graph) -> dict[str, str]:
    return {e.root: e.reason for e in graph.excluded}


def pruned_at_random_keeps(model: nn.Module, graph, x: torch.Tensor, seed: int,
                           rounds: int = 3) -> Iterator[tuple[dict[str, np.ndarray], nn.Module]]:
    """``(keep, pruned)`` for random keeps of every unit (counts of chained units from one step of their chain),
    each pruned model already checked to equal the masked model on ``x`` and to have the MACs the cost model
    predicts."""
    costs = network_costs(model, graph, x[:1])
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        counts = {u.name: int(rng.integers(1, u.n_channels + 1)) for u in graph.units}
        for chain in graph.chains:  # counts a chunk's balance ties: one step of the chain for all its units
            step = int(rng.integers(max(len(o) for o in chain.values())))
            counts.update({u: options[min(step, len(options) - 1)] for u, options in chain.items()})
        keep = {u.name: np.sort(rng.choice(u.n_channels, counts[u.name], replace=False)) for u in graph.units}
        plan = PruningPlan(keep)
        pruned = apply_pruning(model, graph, plan, x[:1])
        with torch.no_grad():
            masked = masked_copy(model, graph, plan)(x)
            torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))
        counts = {u: int(k.size) for u, k in keep.items()}
        assert costs.evaluate(counts)["macs"] == count_macs_params(pruned, x[:1])[0]
        yield keep, pruned


def test_chunked_producer_is_one_unit_tying_both_parts():
    model, x = c2f()
    graph = graph_of(model, x[:1])
    assert [e.root for e in graph.excluded] == ["fc"]  # every conv of both C2f blocks is a unit
    unit = graph["block1.cv1.conv"]
    assert (unit.n_channels, unit.tie, unit.carried) == (8, 2, ("block1.cv1.bn",))
    assert unit.traced[0] == ("block1.cv1.conv", tuple(range(16)))
    readers = {c.name: c for c in unit.consumers}
    # cv2 reads cat(part0, part1, m0): decision c is its inputs c and 8 + c, inputs 16..23 are another unit's
    cv2 = readers["block1.cv2.conv"]
    assert (cv2.tie, cv2.n_input_channels) == (2, 24)
    np.testing.assert_array_equal(cv2.input_channels, np.arange(8)[:, None] + [0, 8])
    m0 = readers["block1.m.0.cv1.conv"]  # the second part, all its inputs
    assert (m0.tie, m0.channels) == (1, None)
    # the bottleneck outputs are units too (torch-pruning tied them to cv1 through its wrong split maps)
    assert [c.name for c in graph["block1.m.0.cv2.conv"].consumers] == ["block1.cv2.conv"]
    assert graph.consumer("block1.cv2.conv") in graph.readers("block1.cv2.conv")
    block2 = {c.name: c for c in graph["block2.m.0.cv2.conv"].consumers}
    assert block2["block2.cv2.conv"].channels == tuple(range(24, 36)) and block2["block2.m.1.cv1.conv"].channels is None


def test_random_keeps_prune_like_the_masked_model_and_the_chunk_stays_valid():
    model, x = c2f()
    for keep, pruned in pruned_at_random_keeps(model, graph_of(model, x[:1]), x, seed=5):
        k1, k2 = keep["block1.cv1.conv"].size, keep["block2.cv1.conv"].size
        assert pruned.block1.cv1.conv.out_channels == 2 * k1 and pruned.block1.cv1.bn.num_features == 2 * k1
        parts = pruned.block1.cv1(pruned.stem(x[:1])).chunk(2, 1)  # the literal chunk count still splits into equal parts
        assert [p.shape[1] for p in parts] == [k1, k1] == [pruned.block1.m[0].cv1.conv.in_channels] * 2
        assert pruned.block1.cv2.conv.in_channels == 2 * k1 + keep["block1.m.0.cv2.conv"].size
        assert pruned.block2.cv2.conv.in_channels == 2 * k2 + keep["block2.m.0.cv2.conv"].size \
            + keep["block2.m.1.cv2.conv"].size


def test_unit_problem_reads_the_kept_columns_of_each_part():
    """cv2's part of the cv1 unit at a mask = hand-sliced least squares on inputs K, 8 + K and the fixed 16..23."""
    model, x = c2f()
    graph = graph_of(model, x[:1])
    consumer = next(c for c in graph["block1.cv1.conv"].consumers if c.name == "block1.cv2.conv")
    seen = {}
    handle = model.block1.cv2.conv.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    with torch.no_grad():
        model(x)
    handle.remove()
    X = seen["x"].permute(0, 2, 3, 1).reshape(-1, 24).double().numpy()  # a 1x1 conv: one column per channel
    Y = seen["y"].permute(0, 2, 3, 1).reshape(-1, 16).double().numpy()
    part = unit_part(LayerProblem.from_arrays(X, Y), consumer)
    assert (part.n_channels, part.group_size) == (8, 2)
    rng = np.random.default_rng(0)
    for _ in range(4):
        kept = np.flatnonzero(rng.random(8) < 0.5)
        cols = np.concatenate([kept, 8 + kept, np.arange(16, 24)])
        w = np.linalg.lstsq(X[:, cols], Y, rcond=None)[0]
        expected = float(((Y - X[:, cols] @ w) ** 2).sum())
        mask = np.zeros(8, dtype=bool)
        mask[kept] = True
        assert part.objective(mask) == pytest.approx(expected, rel=1e-6, abs=1e-6 * float((Y ** 2).sum()))


class Split(nn.Module):
    """A conv whose 12 channels are split (``how``) into a 3x3 conv and a 1x1 conv, concatenated, pooled."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        first = 4 if how == "sizes" else 6
        self.a, self.b = nn.Conv2d(first, 6, 3, padding=1), nn.Conv2d(12 - first, 6, 1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        if self.how == "sizes":
            p, q = torch.split(y, [4, 8], 1)
        elif self.how == "size":
            p, q = y.split(6, 1)  # a literal size: the same autograd graph as chunk(2), not the same after pruning
        else:
            p, q = y.chunk(2, 1)
        z = torch.cat([self.a(p), self.b(q)], 1)
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


@pytest.mark.parametrize("how, reason", [("sizes", "literal sizes [4, 8]"), ("size", "only `chunk` is followed")])
def test_a_split_with_literal_sizes_is_left_alone_with_its_reason(how, reason):
    torch.manual_seed(0)
    graph = graph_of(Split(how).eval(), torch.randn(1, 3, 8, 8))
    assert "conv" not in graph and reason in reasons(graph)["conv"]
    assert {"a", "b"} <= set(graph.names)  # what does not pass through the split is still pruned


def test_chunk_read_by_two_convs():
    torch.manual_seed(0)
    graph = graph_of(Split("chunk").eval(), torch.randn(1, 3, 8, 8))
    unit = graph["conv"]
    assert (unit.n_channels, unit.tie) == (6, 2) and [c.input_channels.tolist() for c in unit.consumers] == [
        list(range(6)), list(range(6))]
    model, x = c2f(shortcut=True)  # YOLOv8's backbone C2f: tests/network/test_chunk_shortcut.py
    assert "block1.cv1.conv" in graph_of(model, x[:1])
