"""UCP's excitation blocks: their shapes, hooks on a copy only, and the scores of a channel that is zero."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from orprune.examples.datasets import load_digits
from orprune.training import train
from orprune.ucp import ExcitationBlock, se_importance
from tests.models import one_thread, small_model  # noqa: F401  (one_thread: module fixture)


@pytest.mark.parametrize("channels, hidden, bias", [(1, 1, True), (8, 1, True), (16, 1, True), (17, 1, False),
                                                    (32, 2, False), (40, 2, False), (64, 4, False)])
def test_block_shapes(channels, hidden, bias):
    block = ExcitationBlock(channels)
    # C <= 16: C -> 1 -> C with biases; else C -> C/16 -> C without
    assert block.squeeze_to.weight.shape == (hidden, channels)
    assert block.expand.weight.shape == (channels, hidden)
    assert (block.squeeze_to.bias is not None) is bias and (block.expand.bias is not None) is bias
    for shape in [(5, channels, 7, 6), (5, channels)]:
        x = torch.randn(shape)
        y = block(x)
        assert y.shape == x.shape
        e = block.excitation(x)
        assert e.shape == (5, channels)
        torch.testing.assert_close(e, torch.full_like(e, 0.5))  # zero-initialised expansion: 1/2 everywhere
        torch.testing.assert_close(y, 0.5 * x)
    other = ExcitationBlock(channels, zero_init=False)
    e = other.excitation(torch.randn(5, channels, 3, 3))
    assert bool(((e > 0) & (e < 1)).all())
    with pytest.raises(ValueError, match="expected inputs"):
        block(torch.randn(2, channels + 1, 3, 3))


def test_orient_keeps_the_output_and_wakes_hidden_units():
    block = ExcitationBlock(32)
    with torch.no_grad():
        block.squeeze_to.weight.copy_(-block.squeeze_to.weight.abs())
    x = torch.rand(6, 32, 4, 4)  # positive inputs: every hidden unit would start dead
    e = block.excitation(x)
    torch.testing.assert_close(e, torch.full_like(e, 0.5))
    assert block.oriented and bool((block.squeeze_to(x.mean((2, 3))) > 0).all())


@pytest.mark.parametrize("bad, match", [(0, "`channels`"), (2.5, "`channels`")])
def test_bad_block(bad, match):
    with pytest.raises(ValueError, match=match):
        ExcitationBlock(bad)
    with pytest.raises(ValueError, match="`reduction`"):
        ExcitationBlock(8, reduction=0)


@pytest.fixture(scope="module")
def mlp():
    """An MLP trained on the digits, then channel 3 of the first unit and 7 of the second zeroed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12, bias=False), nn.ReLU(), nn.Linear(12, 24, bias=False),
                          nn.ReLU(), nn.Linear(24, 10))
    x, y = load_digits("train")
    train(model, x, y, epochs=10, batch_size=64, lr=0.1, flip=False, progress=False)
    with torch.no_grad():
        model[1].weight[3] = 0
        model[3].weight[7] = 0
    return model, x[:512], y[:512]


@pytest.mark.parametrize("freeze", [True, False])
def test_a_zero_channel_keeps_one_half_and_ranks_last(mlp, freeze):
    model, x, y = mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = se_importance(model, x, y, epochs=10, batch_size=64, lr=0.5, flip=False, freeze=freeze)
    assert set(result.scores) == {"1", "3"}
    assert result.scores["1"].shape == (12,) and result.scores["3"].shape == (24,)
    assert result.producers["1"] == ("1",) and result.freeze is freeze and result.status == "feasible"
    if freeze:
        # no gradient reaches the gate of a channel that is zero everywhere: it keeps its start, exactly 1/2
        # (trained jointly, the zero weights themselves move and the channel comes back)
        assert result.scores["1"][3] == pytest.approx(0.5, abs=1e-7)
        assert result.scores["3"][7] == pytest.approx(0.5, abs=1e-7)
        # the frozen network wants its live channels back at full strength: their gates rise, the zero one's
        # stays, so it ranks last (an exact tie with a channel that never fires is allowed)
        assert result.scores["1"][3] <= result.scores["1"].min() + 1e-7
        assert np.sum(result.scores["1"] > 0.5 + 1e-3) >= 6
        assert 3 not in result.top("1", int(np.sum(result.scores["1"] > 0.5 + 1e-3)))
    # the caller's model is untouched and carries no hook
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_residual_network_scores_every_unit_and_stream_producers():
    model, example = small_model("resnet20")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, *example.shape[1:], generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    result = se_importance(model, x, y, epochs=1, batch_size=8)
    from orprune.network.graph import find_groups

    graph = find_groups(model, x[:1])
    assert set(result.scores) == set(graph.names)
    for unit in graph.units:
        assert result.scores[unit.name].shape == (unit.n_channels,)
        assert bool(np.all((result.scores[unit.name] > 0) & (result.scores[unit.name] < 1)))
        assert result.producers[unit.name][0] == unit.root
    stream = [u for u in graph.units if len(result.producers[u.name]) > 1]
    assert stream, "a residual stream has several producers (the stem or shortcut and every block's conv2)"
    with pytest.raises(ValueError, match="`units`"):
        se_importance(model, x, y, units=["nope"], graph=graph)
    with pytest.raises(ValueError, match="`labels`"):
        se_importance(model, x, y[:3])
    with pytest.raises(ValueError, match="`epochs`"):
        se_importance(model, x, y, epochs=0)
