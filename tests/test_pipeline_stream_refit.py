"""The sequential refit in one streamed pass (orprune/network/streaming.py) gives the updates of one pass per
consumer, bit for bit; models it does not support fall back to the passes, and the result says which ran."""

import operator
import warnings

import pytest
import torch
import torch.nn as nn

import orprune
from orprune.network.surgery import masked_copy
from tests.models import TinyNet, one_thread, small_model  # noqa: F401  (one_thread: module fixture)
from tests.network.test_residual_targets import batches as tiny_batches
from tests.network.test_residual_targets import tiny


def calibration(example: torch.Tensor, n: int = 3, size: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(size, *example.shape[1:], generator=gen) for _ in range(n)]


def fitted(model: nn.Module, data: list, **options) -> orprune.Pruner:
    opts = dict(solver="greedy", progress=False, positions_per_image=8, polish_time=None)
    opts.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return orprune.Pruner(**opts).fit(model, data)


def both_paths(pruner: orprune.Pruner, **budget):
    """The pruned result with the streamed refit and with one pass per consumer (``refit_memory=0``)."""
    budget = budget or {"macs": 0.5}
    streamed = pruner.prune(**budget)
    memory, pruner.refit_memory = pruner.refit_memory, 0
    try:
        passes = pruner.prune(**budget)
    finally:
        pruner.refit_memory = memory
    assert passes.refit.path == "passes" and "refit_memory=0" in passes.refit.reason
    return streamed, passes


def assert_same_updates(a, b):
    assert a.plan.updates.keys() == b.plan.updates.keys() and a.plan.updates
    for name, update in a.plan.updates.items():
        other = b.plan.updates[name]
        assert torch.equal(torch.as_tensor(update.weight), torch.as_tensor(other.weight)), name
        assert (update.bias is None) == (other.bias is None), name
        if update.bias is not None:
            assert torch.equal(torch.as_tensor(update.bias), torch.as_tensor(other.bias)), name


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
@pytest.mark.parametrize("float32", [False, True])
def test_streamed_refit_equals_one_pass_per_consumer(name, float32):
    model, example = small_model(name)
    pruner = fitted(model, calibration(example), float32_statistics=float32)
    streamed, passes = both_paths(pruner)
    assert streamed.refit.path == "stream" and streamed.refit.reason is None
    assert streamed.refit.consumers == len(streamed.plan.updates)
    assert 0 < streamed.refit.peak_bytes <= 1.5 * streamed.refit.estimated_bytes
    assert_same_updates(streamed, passes)
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(example), masked_copy(model, pruner.graph_, streamed.plan)(example),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("add", [operator.add, operator.iadd])
def test_residual_targets_with_a_partner_computed_after_the_consumer(add):
    # b_conv2's partner is the projection shortcut's BatchNorm, which runs after it and reads b_sc, a consumer
    # refitted later: the streamed pass computes it for b_conv2 with b_sc's weights as they are then
    model, _ = tiny(add)
    pruner = fitted(model, tiny_batches(), positions_per_image=None, ridge=0.0)
    assert {"b_conv2", "b_sc", "a2_conv2"} <= set(pruner.residual_targets_)
    streamed, passes = both_paths(pruner, macs=0.55, allocation="uniform")
    assert streamed.refit.path == "stream"
    assert {"b_conv2", "b_sc", "a2_conv2"} <= set(streamed.plan.updates)
    assert_same_updates(streamed, passes)


class Untraceable(nn.Module):
    """Control flow on a tensor value: ``torch.fx.symbolic_trace`` cannot trace it."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x):
        if x.sum() > -1e30:
            return self.net(x)
        return -self.net(x)


class Twice(nn.Module):
    """A consumer run twice per forward pass (shared weights)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv2(torch.relu(self.conv1(x)))))))


class Counting(nn.Module):
    """Its output changes from call to call: the traced graph (frozen at trace time) does not reproduce it."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = TinyNet(), 0

    def forward(self, x):
        self.calls += 1
        return self.net(x) * (1.0 + 1e-3 * self.calls)


@pytest.mark.parametrize("model, reason", [(Untraceable, "cannot trace"), (Twice, "called 2 times"),
                                           (Counting, "does not reproduce")])
def test_models_the_stream_does_not_support_fall_back_to_one_pass_per_consumer(model, reason):
    torch.manual_seed(0)
    model = model().eval()
    data = [torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pruner = fitted(model, data)
    result = pruner.prune(macs=0.6)
    assert result.refit.path == "passes" and reason in result.refit.reason, result.refit
    assert result.plan.updates
    if model.__class__ is not Counting:  # (its every call differs)
        _, passes = both_paths(pruner, macs=0.6)
        assert_same_updates(result, passes)


def test_memory_limit_and_sequential_off():
    model, example = small_model("resnet20")
    pruner = fitted(model, calibration(example))
    streamed = pruner.prune(macs=0.5)
    pruner.refit_memory = streamed.refit.estimated_bytes - 1
    limited = pruner.prune(macs=0.5)
    assert limited.refit.path == "passes" and "above the limit" in limited.refit.reason
    assert_same_updates(streamed, limited)
    pruner.refit_memory = streamed.refit.estimated_bytes
    assert pruner.prune(macs=0.5).refit.path == "stream"
    pruner.sequential = False
    assert pruner.prune(macs=0.5).refit.path == "parallel"
    assert pruner.prune(macs=0.5).to_dict()["refit"]["path"] == "parallel"


@pytest.mark.parametrize("value", [-1, True, "1e9", float("nan")])
def test_bad_refit_memory_is_refused(value):
    with pytest.raises(ValueError, match="`refit_memory`"):
        orprune.Pruner(refit_memory=value).fit(TinyNet(), [torch.randn(2, 2, 6, 6)])
