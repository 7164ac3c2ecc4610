"""The sequential refit in one streamed pass (orprune/network/streaming.py) gives the updates of one pass per
consumer, bit for bit; models it does not support fall back to the passes, and the result says which ran."""

import copy
import operator
import warnings

import pytest
import torch
import torch.nn as nn

import orprune
from orprune.network import streaming
from orprune.network.surgery import masked_copy
from tests.models import TinyNet, one_thread, small_model  # noqa: F401  (one_thread: module fixture)
from tests.network.test_residual_targets import batches as tiny_batches
from tests.network.test_residual_targets import tiny


def calibration(example: torch.Tensor, n: int = 3, size: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(size, *example.shape[1:], generator=gen) for _ in range(n)]


_FITTED: dict = {}


def fitted(model: nn.Module, data: list, key: str | None = None, **options) -> orprune.Pruner:
    """A fitted pruner; with a ``key``, one fit per key and options shared by the tests (each gets a shallow copy:
    its own options, the same curves)."""
    opts = dict(solver="greedy", progress=False, positions_per_image=8, polish_time=None)
    opts.update(options)
    cache_key = None if key is None else (key, tuple(sorted(options.items())))
    if cache_key not in _FITTED or cache_key is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _FITTED[cache_key] = orprune.Pruner(**opts).fit(model, data)
    return copy.copy(_FITTED[cache_key])


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
    pruner = fitted(model, calibration(example), name, float32_statistics=float32)
    streamed, passes = both_paths(pruner)
    assert streamed.refit.path == "stream" and streamed.refit.reason is None
    assert streamed.refit.consumers == len(streamed.plan.updates)
    assert 0 < streamed.refit.peak_bytes <= 1.5 * streamed.refit.estimated_bytes
    assert_same_updates(streamed, passes)
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(example), masked_copy(model, pruner.graph_, streamed.plan)(example),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("add", [operator.add, operator.iadd])
@pytest.mark.parametrize("memory", [None, 1])
def test_residual_targets_with_a_partner_computed_after_the_consumer(add, memory):
    # b_conv2's partner is the projection shortcut's BatchNorm, which runs after it and reads b_sc, a consumer
    # refitted later: the streamed pass computes it for b_conv2 with b_sc's weights as they are then.
    # memory=1: no room for any batch's values: every consumer recomputed from the inputs (in-place adds included)
    model, _ = tiny(add)
    pruner = fitted(model, tiny_batches(), positions_per_image=None, ridge=0.0, refit_memory=memory)
    assert {"b_conv2", "b_sc", "a2_conv2"} <= set(pruner.residual_targets_)
    streamed, passes = both_paths(pruner, macs=0.55, allocation="uniform")
    assert streamed.refit.path == "stream"
    # one pass, and the shortcut computed ahead for b_conv2 (2 of 29 nodes); or a recomputation per consumer
    assert streamed.refit.passes < 1.1 if memory is None else streamed.refit.passes > 2
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


@pytest.mark.parametrize("name, fractions", [("resnet20", (0.6, 0.3, 0.0)), ("mobilenet_v2", (0.5, 0.0))])
def test_a_memory_limit_recomputes_from_checkpoints_with_the_same_updates(name, fractions):
    model, example = small_model(name)
    pruner = fitted(model, calibration(example), name, float32_statistics=False)
    pruner.refit_memory = None
    streamed, passes = both_paths(pruner)
    assert streamed.refit.passes < 1.1 and streamed.refit.peak_bytes <= 1.5 * streamed.refit.estimated_bytes
    previous = streamed.refit
    for fraction in fractions:  # less room: more recomputation, less held
        pruner.refit_memory = max(1, int(fraction * streamed.refit.estimated_bytes))
        limited = pruner.prune(macs=0.5)
        assert limited.refit.path == "stream" and limited.refit.passes > 1.0
        assert limited.refit.passes >= previous.passes and limited.refit.peak_bytes <= previous.peak_bytes
        assert_same_updates(limited, passes)
        previous = limited.refit
    # no room at all: one recomputation from the inputs per consumer, as many layers as the per-consumer passes
    assert previous.passes > 3


def test_a_failure_inside_the_stream_starts_again_with_one_pass_per_consumer(monkeypatch):
    model, example = small_model("resnet20")
    pruner = fitted(model, calibration(example), "resnet20", float32_statistics=False)
    expected = pruner.prune(macs=0.5)
    original = streaming._Stream._record
    calls = []

    def fail_later(self, stream, *args):
        calls.append(stream.name)
        if len(set(calls)) > 3:  # three consumers refitted and written into the working copy
            raise RuntimeError("planted")
        return original(self, stream, *args)

    monkeypatch.setattr(streaming._Stream, "_record", fail_later)
    result = pruner.prune(macs=0.5)
    assert result.refit.path == "passes" and "RuntimeError: planted" in result.refit.reason
    assert_same_updates(result, expected)


def test_sequential_off_and_the_report():
    model, example = small_model("resnet20")
    pruner = fitted(model, calibration(example), "resnet20", float32_statistics=False)
    pruner.sequential = False
    assert pruner.prune(macs=0.5).refit.path == "parallel"
    assert pruner.prune(macs=0.5).to_dict()["refit"]["path"] == "parallel"


@pytest.mark.parametrize("value", [-1, True, "1e9", float("nan")])
def test_bad_refit_memory_is_refused(value):
    with pytest.raises(ValueError, match="`refit_memory`"):
        orprune.Pruner(refit_memory=value).fit(TinyNet(), [torch.randn(2, 2, 6, 6)])


def test_half_precision_target_cache_changes_the_refit_by_float16_rounding_only(monkeypatch):
    # the default cache keeps float16 targets (11 significant bits, 2^-12 relative): the refit's weights move by
    # under 1% (3.5e-3 at most here, the rounding amplified by the least squares' conditioning), its error not.
    # 96 images x 8 positions: more rows than any consumer's 576 columns (well-determined least squares)
    from orprune.network import _consumer_stream

    model, example = small_model("resnet20")
    data = calibration(example, n=3, size=32)
    half = fitted(model, data).prune(macs=0.5)
    monkeypatch.setattr(_consumer_stream, "HALF_TARGETS", False)
    exact = fitted(model, data).prune(macs=0.5)
    assert half.plan.keep.keys() == exact.plan.keep.keys() and half.plan.updates.keys() == exact.plan.updates.keys()
    for name, update in exact.plan.updates.items():
        w, w_half = torch.as_tensor(update.weight), torch.as_tensor(half.plan.updates[name].weight)
        assert not torch.equal(w, w_half) and (w_half - w).norm() <= 1e-2 * w.norm(), name
    with torch.no_grad():  # as close to the original model as the exact cache's refit (0.532 vs 0.531 here)
        original = model(example)
        error, error_half = ((m(example) - original).norm() / original.norm() for m in (exact.model, half.model))
    assert abs(error_half - error) <= 1e-2 * error
