"""YOLOv8's backbone C2f (``shortcut=True``): the chunk's second part and every bottleneck output added into it
are one residual stream. The bottlenecks' output convs are carried as producers of the chunk's unit; pruned ==
masked, the kept stream channels are the original ones, the chunk stays valid, the MACs are predicted
(``formulations/split_and_shuffle.md`` section 3)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch
from torch import nn

import orprune
from orprune.examples.coverage_zoo import randomize_batchnorm
from orprune.examples.csp_zoo import SPPF, C2f, ConvBNSiLU
from orprune.network.costs import count_macs_params, network_costs
from orprune.network.surgery import PruningPlan, apply_pruning, masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)
from tests.network.test_chunk import c2f, graph_of, pruned_at_random_keeps, reasons


def test_shortcut_stream_is_one_unit_with_the_bottleneck_outputs_as_producers():
    model, x = c2f(shortcut=True)
    graph = graph_of(model, x[:1])
    assert [e.root for e in graph.excluded] == ["fc"]
    assert "block1.m.0.cv2.conv" not in graph and "block2.m.1.cv2.conv" not in graph  # producers of the stream
    one, two = graph["block1.cv1.conv"], graph["block2.cv1.conv"]
    assert (one.n_channels, one.tie, one.carried) == (8, 2, ("block1.cv1.bn", "block1.m.0.cv2.conv", "block1.m.0.cv2.bn"))
    assert two.carried == ("block2.cv1.bn", "block2.m.0.cv2.conv", "block2.m.0.cv2.bn", "block2.m.1.cv2.conv",
                           "block2.m.1.cv2.bn")
    traced = dict(two.traced)  # a bottleneck output's channel i stands for decision i (root channels i and 12 + i)
    assert traced["block2.m.1.cv2.conv"] == tuple(range(12))
    readers = {c.name: c for c in two.consumers}
    # cv2 reads cat(part0, part1, m0 + part1, m1 + (m0 + part1)): decision c is its inputs c, 12 + c, 24 + c, 36 + c
    assert (readers["block2.cv2.conv"].tie, readers["block2.cv2.conv"].n_input_channels) == (4, 48)
    np.testing.assert_array_equal(readers["block2.cv2.conv"].input_channels, np.arange(12)[:, None] + [0, 12, 24, 36])
    assert all(readers[f"block2.m.{i}.cv1.conv"].channels is None for i in (0, 1))  # the stream, all of it
    np.testing.assert_array_equal(graph.consumer("block1.cv2.conv").input_channels, np.arange(8)[:, None] + [0, 8, 16])


def test_random_keeps_prune_like_the_masked_model_with_the_stream_intact():
    model, x = c2f(shortcut=True)
    for keep, pruned in pruned_at_random_keeps(model, graph_of(model, x[:1]), x, seed=7):
        k1, k2 = keep["block1.cv1.conv"].size, keep["block2.cv1.conv"].size
        parts = pruned.block2.cv1(torch.randn(1, pruned.block2.cv1.conv.in_channels, 8, 8)).chunk(2, 1)  # the literal chunk still splits equally
        assert [p.shape[1] for p in parts] == [k2, k2]
        assert [b.cv2.conv.out_channels for b in pruned.block2.m] == [k2, k2] == [b.cv1.conv.in_channels
                                                                                for b in pruned.block2.m]
        assert pruned.block1.m[0].cv2.bn.num_features == k1 and pruned.block1.cv2.conv.in_channels == 3 * k1
        assert pruned.block2.cv2.conv.in_channels == 4 * k2


def test_stream_inside_the_block_matches_the_masked_model():
    """Inside the block, not only at the output: with only block 2's stream unit pruned, the second part (what
    enters the first bottleneck) keeps the original channels, and the stream after both adds is the masked
    model's at the kept channels (the bottlenecks' first convs lost the dropped inputs)."""
    model, x = c2f(shortcut=True)
    graph = graph_of(model, x[:1])
    kept = np.array([0, 3, 4, 9, 11])
    plan = PruningPlan({"block2.cv1.conv": kept})
    pruned, masked = apply_pruning(model, graph, plan, x[:1]), masked_copy(model, graph, plan)
    seen = {}
    hooks = [block.register_forward_hook(lambda _m, args, out, key=key: seen.update({key: (args[0], out)}))
             for key, block in (("original", model.block2.m[0]), ("masked", masked.block2.m[1]),
                                ("pruned0", pruned.block2.m[0]), ("pruned", pruned.block2.m[1]))]
    with torch.no_grad():
        model(x), masked(x), pruned(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["pruned0"][0], seen["original"][0][:, kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["pruned"][1], seen["masked"][1][:, kept], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen["masked"][1], seen["original"][1])  # the masked stream differs: not a no-op


class OneBottleneck(nn.Module):
    """One shortcut C2f block between a stem and a Linear head: the smallest backbone C2f."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = ConvBNSiLU(3, 8, 3), C2f(8, 12, 1, shortcut=True)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1))


def test_one_bottleneck_prunes_like_the_masked_model():
    torch.manual_seed(1)
    model, x = randomize_batchnorm(OneBottleneck()).eval(), torch.randn(2, 3, 12, 12)
    graph = graph_of(model, x[:1])
    unit = graph["block.cv1.conv"]
    assert (unit.n_channels, unit.tie) == (6, 2) and "block.m.0.cv2.conv" in unit.carried
    plan = PruningPlan({"block.cv1.conv": np.array([1, 2, 5]), "block.m.0.cv1.conv": np.array([0, 4])})
    pruned = apply_pruning(model, graph, plan, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_copy(model, graph, plan)(x), rtol=1e-4, atol=1e-6)
    assert pruned.block.cv2.conv.in_channels == 9
    assert network_costs(model, graph, x[:1]).evaluate({"block.cv1.conv": 3, "block.m.0.cv1.conv": 2})["macs"] \
        == count_macs_params(pruned, x[:1])[0]


class SingleConvShortcut(nn.Module):
    """``x + conv(x)`` on a chunk's part: the conv reads and writes the stream (not built)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.inner, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, 1)
        return self.out(torch.cat([a, b + self.inner(b)], 1)).mean((2, 3))


def test_a_conv_reading_and_writing_the_stream_is_left_alone():
    torch.manual_seed(0)
    graph = graph_of(SingleConvShortcut().eval(), torch.randn(1, 3, 8, 8))
    assert "conv" not in graph and "reads the unit's channels and writes into them" in reasons(graph)["conv"]


def test_pruner_reaches_half_the_macs_with_pruned_equal_to_masked():
    model, x = c2f(shortcut=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=4).fit(model, [x])
    for budget in (0.5, 0.3):  # at 0.5 the solver keeps both streams whole (costly to cut), at 0.3 it cuts both
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the cost model predicts torch-pruning's count
            result = pruner.prune(macs=budget)
        assert result.macs_after <= budget * result.macs_before
        with torch.no_grad():
            masked = masked_copy(model, pruner.graph_, result.plan)(x)
            torch.testing.assert_close(result.model(x), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))
    assert all(result.plan.keep[u].size < pruner.graph_[u].n_channels for u in ("block1.cv1.conv", "block2.cv1.conv"))


class WithSPPF(nn.Module):
    """YOLOv8's SPPF after a stem: ``cv2`` reads ``cv1``'s channels four times (through three max pools)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.sppf, self.fc = ConvBNSiLU(3, 16, 3), SPPF(16, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(self.sppf(self.stem(x)), 1).flatten(1))


def test_sppf_unit_read_four_times_by_one_concatenation():
    """No chunk: torch-pruning's group is refused (a consumer reading the unit twice); orprune's label maps take it."""
    torch.manual_seed(0)
    model, x = randomize_batchnorm(WithSPPF()).eval(), torch.randn(2, 3, 12, 12)
    graph = graph_of(model, x[:1])
    unit = graph["sppf.cv1.conv"]
    assert (unit.n_channels, unit.tie, unit.carried) == (8, 1, ("sppf.cv1.bn",))
    np.testing.assert_array_equal(graph.consumer("sppf.cv2.conv").input_channels, np.arange(8)[:, None] + [0, 8, 16, 24])
    plan = PruningPlan({"sppf.cv1.conv": np.array([0, 2, 3, 7]), "stem.conv": np.arange(0, 16, 2)})
    pruned = apply_pruning(model, graph, plan, x[:1])
    with torch.no_grad():
        masked = masked_copy(model, graph, plan)(x)
        torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))
    assert pruned.sppf.cv2.conv.in_channels == 16
    assert network_costs(model, graph, x[:1]).evaluate({"sppf.cv1.conv": 4, "stem.conv": 8})["macs"] \
        == count_macs_params(pruned, x[:1])[0]


def test_ucp_excitations_cover_the_stream_producers():
    """UCP's excitation blocks go after every producer of a unit: a bottleneck output conv writes only the stream's
    channels (half the root's), its block has that width and its excitations count for those root channels."""
    from orprune.ucp import se_importance

    model, _ = c2f(shortcut=True)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = se_importance(model, x, y, epochs=1, batch_size=8, freeze=True, units=["block2.cv1.conv"])
    assert result.producers["block2.cv1.conv"] == ("block2.cv1.conv", "block2.m.0.cv2.conv", "block2.m.1.cv2.conv")
    scores = result.scores["block2.cv1.conv"]
    assert scores.shape == (12,) and np.all(np.isfinite(scores)) and np.all(scores > 0)


def test_sppf_fallback_follows_the_reason_code_not_its_words(monkeypatch):
    """The refused SPPF group carries ``code="partial_read"`` beside its unchanged message, and the label-map retry
    keys on that code: reworded, the message still goes through orprune's label maps."""
    from orprune.network import graph as graph_module

    model, x = WithSPPF().eval(), torch.randn(1, 3, 12, 12)
    monkeypatch.setattr(graph_module, "traced_units", lambda *args: [(None, "sppf.cv1.conv", "planted")])
    refused = {e.root: e for e in graph_of(model, x).excluded}["sppf.cv1.conv"]
    assert refused.code == "partial_read"
    assert refused.reason == "consumer sppf.cv2.conv reads these channels out of order or partly"  # words unchanged
    monkeypatch.undo()
    classify = graph_module._classify

    def reworded(*args, **kwargs):  # every refusal's words changed, its code kept
        unit, refused = classify(*args, **kwargs)
        return unit, None if refused is None else dataclasses.replace(refused, reason="some new wording")

    monkeypatch.setattr(graph_module, "_classify", reworded)
    graph = graph_of(model, x)
    assert "sppf.cv1.conv" in graph and [e.code for e in graph.excluded] == ["model_output"]  # only the logits
