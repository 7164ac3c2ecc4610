"""Residual-aware refit targets: detection by torch.fx, the corrected least squares, the pipeline option."""

import logging
import operator
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from orprune.network import _consumer_stream
from orprune.network.calibration import TargetCache, collect_statistics
from orprune.network.graph import find_groups
from orprune.network.residual_targets import ResidualTarget, Tap, TargetOffset, find_residual_targets
from orprune.network.surgery import PruningPlan, masked_copy
from orprune.pipeline import Pruner
from tests.models import calibrate_batchnorm, mobilenet_v2, one_thread, resnet18  # noqa: F401  (one_thread: module fixture)


@pytest.fixture(scope="module", autouse=True)
def exact_target_cache():
    """These tests check the refit's least squares to 1e-7 and better: the cache keeps exact float32 targets
    (the default half-precision cache is checked in tests/network/test_calibration.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_consumer_stream, "HALF_TARGETS", False)
        yield


ADDS = {
    "plus": operator.add,
    "torch.add": torch.add,
    "iadd": operator.iadd,
    "Tensor.add": lambda a, b: a.add(b),
    "Tensor.add_": lambda a, b: a.add_(b),
}


class TinyResNet(nn.Module):
    """Stem, two identity blocks, a projection block, a Linear head; ``add`` joins the branches."""

    def __init__(self, add=operator.add, width=(6, 8)):
        super().__init__()
        w0, w1 = width
        self.add = add
        self.stem = nn.Conv2d(3, w0, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(w0)
        for block in ("a1", "a2"):
            setattr(self, f"{block}_conv1", nn.Conv2d(w0, w0, 3, padding=1, bias=False))
            setattr(self, f"{block}_bn1", nn.BatchNorm2d(w0))
            setattr(self, f"{block}_conv2", nn.Conv2d(w0, w0, 3, padding=1, bias=False))
            setattr(self, f"{block}_bn2", nn.BatchNorm2d(w0))
        self.b_conv1 = nn.Conv2d(w0, w1, 3, stride=2, padding=1, bias=False)
        self.b_bn1 = nn.BatchNorm2d(w1)
        self.b_conv2 = nn.Conv2d(w1, w1, 3, padding=1, bias=False)
        self.b_bn2 = nn.BatchNorm2d(w1)
        self.b_sc = nn.Conv2d(w0, w1, 1, stride=2, bias=False)
        self.b_sc_bn = nn.BatchNorm2d(w1)
        self.head = nn.Linear(w1, 5)

    def forward(self, x):
        return self.parts(x)["logits"]

    def parts(self, x):
        """Every intermediate tensor of the forward pass, by name (the test's explicit forward)."""
        p = {}
        p["x0"] = F.relu(self.stem_bn(self.stem(x)))
        p["a1_h"] = F.relu(self.a1_bn1(self.a1_conv1(p["x0"])))
        p["a1_z"] = self.a1_conv2(p["a1_h"])
        p["a1_x"] = F.relu(self.add(self.a1_bn2(p["a1_z"]), p["x0"]))
        p["a2_h"] = F.relu(self.a2_bn1(self.a2_conv1(p["a1_x"])))
        p["a2_z"] = self.a2_conv2(p["a2_h"])
        p["x1"] = F.relu(self.add(self.a2_bn2(p["a2_z"]), p["a1_x"]))
        p["b_h"] = F.relu(self.b_bn1(self.b_conv1(p["x1"])))
        p["b_z"] = self.b_conv2(p["b_h"])
        out = self.b_bn2(p["b_z"])
        p["b_zs"] = self.b_sc(p["x1"])
        p["b_s"] = self.b_sc_bn(p["b_zs"])
        out = self.add(out, p["b_s"])
        p["x2"] = F.relu(out)
        p["logits"] = self.head(F.adaptive_avg_pool2d(p["x2"], 1).flatten(1))
        return p


def tiny(add=operator.add, seed=0):
    torch.manual_seed(seed)
    model = TinyResNet(add)
    example = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 1))
    return calibrate_batchnorm(model, example, seed=seed), example


def batches(n=3, size=16, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=gen) for _ in range(n)]


def consumers_of(model, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return find_groups(model, example)


# ------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("style", list(ADDS))
def test_detects_each_consumer_feeding_an_add_and_the_other_operand(style):
    model, example = tiny(ADDS[style])
    graph = consumers_of(model, example)
    found = find_residual_targets(model, graph.consumers, example)
    # each a*_conv2 is added to a (functional) relu output, seen as the input of the block's conv1;
    # b_conv2 and the shortcut conv are each other's partner, seen at their BatchNorms' outputs
    assert found == {
        "a1_conv2": ResidualTarget("a1_conv2", "a1_bn2", (Tap("a1_conv1", "input"),)),
        "a2_conv2": ResidualTarget("a2_conv2", "a2_bn2", (Tap("a2_conv1", "input"),)),
        "b_conv2": ResidualTarget("b_conv2", "b_bn2", (Tap("b_sc_bn", "output"),)),
        "b_sc": ResidualTarget("b_sc", "b_sc_bn", (Tap("b_bn2", "output"),)),
    }
    assert {c.name for c in graph.consumers} == set(found) | {"a1_conv1", "a2_conv1", "b_conv1", "head"}


def test_a_consumer_added_without_a_norm_and_a_chain_of_adds():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2d(3, 4, 1)
            self.c1 = nn.Conv2d(4, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 1)
            self.c3 = nn.Conv2d(4, 4, 1)
            self.c4 = nn.Conv2d(4, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x0 = torch.tanh(self.c0(x))
            y = self.c1(x0) + x0 + self.c2(x0)  # c1 has two other operands
            z = torch.sigmoid(self.c3(x0)) + x0  # not an affine map between c3 and the add
            z = z + torch.add(x0, self.c4(x0), alpha=0.5)  # a scaled operand: not recognised
            return self.head(y.mean((2, 3)) + z.mean((2, 3)))

    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    found = find_residual_targets(model, ["c1", "c2", "c3", "c4"], x)
    assert found == {"c1": ResidualTarget("c1", None, (Tap("c1", "input"), Tap("c2", "output")))}
    assert found["c1"].offset(model).scale is None  # c2's partner (c1(x0) + x0) is seen by no module hook


def test_torchvision_resnet_and_mobilenet_residuals_are_found():
    model, x = resnet18(width=1 / 16).eval(), torch.randn(1, 3, 32, 32)
    graph = consumers_of(model, x)
    found = find_residual_targets(model, graph.consumers, x)
    expected = {c.name for c in graph.consumers if c.name.endswith(("conv2", "downsample.0"))}
    assert set(found) == expected
    assert all(t.norm == t.consumer.replace("conv2", "bn2").replace("downsample.0", "downsample.1")
               for t in found.values())

    model, x = mobilenet_v2(width=0.25).eval(), torch.randn(1, 3, 32, 32)
    graph = consumers_of(model, x)
    found = find_residual_targets(model, graph.consumers, x)
    projections = {f"features.{i}.conv.{len(m.conv) - 2}" for i, m in enumerate(model.features)
                   if getattr(m, "use_res_connect", False)}  # the 1x1 conv before the last BatchNorm
    assert projections <= {c.name for c in graph.consumers}
    assert set(found) == projections


class Untraceable(TinyResNet):
    def forward(self, x):  # data-dependent control flow: torch.fx cannot trace it
        return self.parts(x)["logits"] if bool(x.sum() > -1e9) else self.parts(-x)["logits"]


def test_untraceable_model_gets_no_correction_and_still_prunes(caplog):
    torch.manual_seed(0)
    example = torch.randn(8, 3, 8, 8)
    model = calibrate_batchnorm(Untraceable(), example)
    with caplog.at_level(logging.DEBUG, logger="orprune.network.residual_targets"):
        assert find_residual_targets(model, ["a2_conv2"], example) == {}
    assert "cannot trace" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches())
        result = pruner.prune(macs=0.6)
    assert pruner.residual_targets_ == {}
    with torch.no_grad():
        torch.testing.assert_close(result.model(example), masked_copy(model, pruner.graph_, result.plan)(example),
                                   rtol=1e-4, atol=1e-4)


def test_offset_scale_is_the_inverse_norm_gain_and_zero_where_the_gain_is():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 0.0, -0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn)
    offset = ResidualTarget("0", "1", (Tap("0"),)).offset(model)
    a = np.array([2.0, 0.0, -0.5]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + bn.eps)
    np.testing.assert_allclose(offset.scale.numpy(), [1 / a[0], 0.0, 1 / a[2]], rtol=1e-12)


# ------------------------------------------------------------------------------------ refit by hand
def _lstsq_with_intercept(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coef = np.linalg.lstsq(np.hstack([x, np.ones((x.shape[0], 1))]), y, rcond=None)[0]
    return coef[:-1], coef[-1]


def _rows(conv: nn.Conv2d, x: torch.Tensor) -> np.ndarray:
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double().numpy()


def _out_rows(z: torch.Tensor) -> np.ndarray:
    return z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1]).double().numpy()


def _gain(bn: nn.BatchNorm2d) -> np.ndarray:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()


@pytest.fixture(scope="module")
def pruned_tiny():
    model, example = tiny()
    with torch.no_grad():
        model.a2_bn2.weight[1] = 0.0  # a zero gain: that channel's target must stay as it was
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = Pruner(solver="greedy", ridge=0.0, positions_per_image=None, progress=False).fit(model, data)
        result = pruner.prune(macs=0.55, allocation="uniform")
    return model, example, data, pruner, result


def _by_hand(model, graph, plan, earlier, name, data):
    """Inputs from the masked model with the ``earlier`` updates, corrected targets from explicit passes."""
    working = masked_copy(model, graph, PruningPlan(plan.keep, {n: plan.updates[n] for n in earlier}))
    xs, ys = [], []
    with torch.no_grad():
        for x in data:
            o, w = model.parts(x), working.parts(x)
            if name in ("a1_conv2", "a2_conv2"):  # the partner is the block input
                block = name[:2]
                a = _gain(getattr(model, f"{block}_bn2"))
                source = "x0" if block == "a1" else "a1_x"
                corr = (_out_rows(o[source]) - _out_rows(w[source])) / np.where(a != 0, a, 1) * (a != 0)
                xs.append(_rows(getattr(model, name), w[f"{block}_h"]))
                ys.append(_out_rows(o[f"{block}_z"]) + corr)
            elif name == "b_conv2":  # the partner is the shortcut, not refitted yet (masked input)
                a = _gain(model.b_bn2)
                xs.append(_rows(model.b_conv2, w["b_h"]))
                ys.append(_out_rows(o["b_z"]) + (_out_rows(o["b_s"]) - _out_rows(w["b_s"])) / a)
            else:  # b_sc: the partner is b_conv2's BatchNorm output, already refitted
                a = _gain(model.b_sc_bn)
                corr = (_out_rows(model.b_bn2(o["b_z"])) - _out_rows(working.b_bn2(w["b_z"]))) / a
                xs.append(_rows(model.b_sc, w["x1"]))
                ys.append(_out_rows(o["b_zs"]) + corr)
    return np.vstack(xs), np.vstack(ys)


@pytest.mark.parametrize("name", ["a1_conv2", "a2_conv2", "b_conv2", "b_sc"])
def test_refit_is_least_squares_on_the_corrected_targets(pruned_tiny, name):
    model, _, data, pruner, result = pruned_tiny
    plan = result.plan
    consumer = pruner.graph_.consumer(name)
    assert consumer.unit in plan.keep, "the test needs this consumer's unit pruned"
    order = [c.name for c in pruner.consumer_order_ if c.unit in plan.keep]
    x, y = _by_hand(model, pruner.graph_, plan, order[: order.index(name)], name, data)
    g = consumer.group_size
    cols = (plan.keep[consumer.unit][:, None] * g + np.arange(g)).ravel()
    weights, intercept = _lstsq_with_intercept(x[:, cols], y)
    update = plan.updates[name]
    np.testing.assert_allclose(update.weight.numpy()[cols], weights, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(update.bias.numpy(), intercept, rtol=1e-6, atol=1e-8)
    assert not update.weight.numpy()[np.setdiff1d(np.arange(x.shape[1]), cols)].any()


def test_cached_and_recomputed_reference_give_the_same_statistics(pruned_tiny):
    model, _, data, pruner, result = pruned_tiny
    working = masked_copy(model, pruner.graph_, PruningPlan(result.plan.keep))
    offsets = {"a2_conv2": pruner.residual_targets_["a2_conv2"].offset(model)}
    plain, cache = TargetCache(), TargetCache()
    collect_statistics(model, pruner.graph_.consumers, data, cache=plain, positions_per_image=None, progress=False)
    collect_statistics(model, pruner.graph_.consumers, data, cache=cache, offsets=offsets,
                       positions_per_image=None, progress=False)
    # the tapped rows: 8x8 positions x 6 channels per image, float32
    assert cache.nbytes == plain.nbytes + 4 * sum(x.shape[0] * 64 * 6 for x in data)
    from_cache = collect_statistics(working, ["a2_conv2"], data, reference=cache, offsets=offsets, progress=False)
    from_model = collect_statistics(working, ["a2_conv2"], data, reference=model, offsets=offsets,
                                    positions_per_image=None, progress=False)
    uncorrected = collect_statistics(working, ["a2_conv2"], data, reference=cache, progress=False)
    for a, b in zip(from_cache["a2_conv2"].statistics(), from_model["a2_conv2"].statistics()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    gram, cross, _ = from_cache["a2_conv2"].statistics()
    np.testing.assert_allclose(gram, uncorrected["a2_conv2"].statistics()[0])  # same inputs...
    assert not np.allclose(cross, uncorrected["a2_conv2"].statistics()[1])  # ...other targets


def test_refit_without_the_target_cache_runs_the_original_beside_and_agrees(pruned_tiny):
    model, _, data, _, result = pruned_tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        uncached = Pruner(solver="greedy", ridge=0.0, positions_per_image=None, progress=False,
                          cache_targets=False).fit(model, data).prune(macs=0.55, allocation="uniform")
    assert uncached.plan.updates.keys() == result.plan.updates.keys()
    for name, update in result.plan.updates.items():
        np.testing.assert_allclose(uncached.plan.updates[name].weight, update.weight, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(uncached.plan.updates[name].bias, update.bias, rtol=1e-7, atol=1e-9)


def test_offset_is_zero_when_the_model_is_its_own_reference(pruned_tiny):
    model, _, data, pruner, _ = pruned_tiny
    offsets = {"a2_conv2": pruner.residual_targets_["a2_conv2"].offset(model)}
    with_offsets = collect_statistics(model, ["a2_conv2"], data, reference=model, offsets=offsets, progress=False)
    without = collect_statistics(model, ["a2_conv2"], data, progress=False)
    for a, b in zip(with_offsets["a2_conv2"].statistics(), without["a2_conv2"].statistics()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------ pipeline
@pytest.mark.parametrize("residual_targets", [True, False])
def test_pruned_equals_masked_with_and_without_the_correction(residual_targets):
    model, example = tiny(operator.iadd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = Pruner(solver="greedy", progress=False, positions_per_image=8,
                        residual_targets=residual_targets).fit(model, batches())
        result = pruner.prune(macs=0.5)
    assert bool(pruner.residual_targets_) == residual_targets
    with torch.no_grad():
        pruned, masked = result.model(example), masked_copy(model, pruner.graph_, result.plan)(example)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))
    assert result.macs_after <= 0.5 * result.macs_before


def test_the_option_changes_only_the_corrected_consumers(pruned_tiny):
    model, _, data, pruner, result = pruned_tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        off = Pruner(solver="greedy", ridge=0.0, positions_per_image=None, progress=False,
                     residual_targets=False).fit(model, data).prune(macs=0.55, allocation="uniform")
    assert {u: k.tolist() for u, k in off.plan.keep.items()} == {u: k.tolist() for u, k in result.plan.keep.items()}
    order = [c.name for c in pruner.consumer_order_ if c.unit in result.plan.keep]
    # a1_conv2's partner is the stem output, which pruning does not change: a zero correction
    for name in order[: order.index("a2_conv2")]:
        np.testing.assert_allclose(off.plan.updates[name].weight, result.plan.updates[name].weight, rtol=1e-9)
    assert not np.allclose(off.plan.updates["a2_conv2"].weight, result.plan.updates["a2_conv2"].weight)


def test_bad_inputs_raise_clear_errors(pruned_tiny):
    model, _, data, pruner, _ = pruned_tiny
    offset = pruner.residual_targets_["a2_conv2"].offset(model)
    with pytest.raises(ValueError, match="`residual_targets` must be True or False"):
        Pruner(residual_targets="yes").fit(model, data)
    with pytest.raises(ValueError, match="`offsets` names 'head'"):
        collect_statistics(model, ["a2_conv2"], data, reference=model, offsets={"head": offset}, progress=False)
    with pytest.raises(ValueError, match="`offsets` must map"):
        collect_statistics(model, ["a2_conv2"], data, reference=model, offsets={"a2_conv2": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"`offsets\['a2_conv2'\].scale` has 2 entries"):
        collect_statistics(model, ["a2_conv2"], data, reference=model, progress=False,
                           offsets={"a2_conv2": TargetOffset(offset.taps, torch.ones(2))})
    with pytest.raises(ValueError, match="not a module of `model`"):
        collect_statistics(model, ["a2_conv2"], data, reference=model, progress=False,
                           offsets={"a2_conv2": TargetOffset((Tap("nope"),))})
    plain = TargetCache()
    collect_statistics(model, ["a2_conv2"], data, cache=plain, progress=False)
    with pytest.raises(ValueError, match="no tapped rows of consumer 'a2_conv2'"):
        collect_statistics(model, ["a2_conv2"], data, reference=plain, offsets={"a2_conv2": offset}, progress=False)
    with pytest.raises(ValueError, match="tapped tensor has shape"):  # a tap of another shape
        collect_statistics(model, ["a2_conv2"], data, reference=model, progress=False,
                           offsets={"a2_conv2": TargetOffset((Tap("b_sc_bn"),))})
    with pytest.raises(ValueError, match="`port` must be"):
        Tap("a2_conv1", "side")
    with pytest.raises(ValueError, match="`taps` must be a non-empty"):
        TargetOffset(())
