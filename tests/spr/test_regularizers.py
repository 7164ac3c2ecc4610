"""Tests of PerspectiveRegularizer (orprune.spr): channel groups against groups written out by
hand for small architectures, the forward value against spr_penalty on hand-gathered weights, the
layer-relative variant, and input validation.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from orprune.spr.penalty import spr_penalty
from orprune.spr.regularizer import PerspectiveRegularizer
from tests.spr.networks import (
    CASES,
    ConvBNNet,
    FlattenMLP,
    ResNet,
    X,
    entry_set,
    expected_groups,
    manual_vectors,
    randomized,
)


@pytest.mark.parametrize("name", list(CASES))
def test_groups_match_hand_built_expectation(name):
    cls, consumers = CASES[name]
    model = randomized(cls(), seed=7)
    reg = PerspectiveRegularizer(model, alpha=0.05, lam=1.0, m_scale=1.5, example_inputs=X,
                                 include_consumers=consumers)
    params = dict(model.named_parameters())
    got = []
    for j in range(reg.n_groups):  # a group's entries = where its penalty has a nonzero gradient
        grads = torch.autograd.grad(reg.penalties()[j], list(params.values()), allow_unused=True)
        got.append(frozenset((n, int(i)) for (n, _), g in zip(params.items(), grads) if g is not None
                             for i in torch.nonzero(g.reshape(-1)).flatten()))
    expected = [entry_set(model, spec) for spec in expected_groups(name)]
    assert Counter(got) == Counter(expected)
    assert sorted(g.size for g in reg.groups_) == sorted(len(e) for e in expected)
    classifier = list(params)[-1].rsplit(".", 1)[0]  # the last Linear: its outputs are never grouped
    assert not any(m.module == classifier and m.dim == "out" for g in reg.groups_ for m in g.members)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_equals_spr_of_hand_gathered_groups(name):
    cls, consumers = CASES[name]
    model = randomized(cls(), seed=8)
    reg = PerspectiveRegularizer(model, alpha=0.05, lam=1.0, m_scale=1.5, example_inputs=X,
                                 include_consumers=consumers)
    vecs, bounds = manual_vectors(model, 1.5, expected_groups(name))
    expected = spr_penalty(vecs, 0.05, 1.0, bounds)
    params = list(model.parameters())
    total = reg()
    torch.testing.assert_close(total, expected.sum())
    g_reg = torch.autograd.grad(total, params, allow_unused=True)
    g_ref = torch.autograd.grad(expected.sum(), params, allow_unused=True)
    for a, b in zip(g_reg, g_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)
    norms = torch.stack([v.detach().norm() for v in vecs])
    assert len(vecs) == reg.n_groups
    assert sorted(reg.group_norms().tolist()) == pytest.approx(sorted(norms.tolist()), rel=1e-12)
    assert sorted(reg.penalties().tolist()) == pytest.approx(sorted(expected.tolist()), rel=1e-12)


def test_mapping_lists_members_for_removal():
    model = randomized(FlattenMLP(), seed=9)
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, example_inputs=X)
    by_root = {(g.root_module, g.root_channel): g for g in reg.groups_}
    assert set(by_root) == {("conv", c) for c in range(4)} | {("fc1", j) for j in range(8)}
    g = by_root[("conv", 2)]
    members = {(m.module, m.dim): m for m in g.members}
    assert members[("conv", "out")].indices == (2,) and members[("bn", "out")].indices == (2,)
    assert members[("fc1", "in")].indices == (8, 9, 10, 11)
    assert not members[("fc1", "in")].penalized  # consumers listed, not penalised by default
    assert g.size == 27 + 1 + 2


def test_auto_bounds_explicit_bounds_and_state_untouched():
    model = randomized(ConvBNNet(), seed=10)
    model.train()
    running = model.bn1.running_mean.clone()
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, m_scale=2.0, example_inputs=X)
    assert model.training and torch.equal(model.bn1.running_mean, running)
    assert reg.bounds_["conv1"] == pytest.approx(
        2.0 * max(model.conv1.weight.abs().max().item(), model.conv1.bias.abs().max().item()))
    assert reg.bounds_["bn2"] == pytest.approx(
        2.0 * max(model.bn2.weight.abs().max().item(), model.bn2.bias.abs().max().item()))
    assert list(reg.parameters()) == [] and reg.state_dict() == {}
    spec = expected_groups("convbn")
    vecs, _ = manual_vectors(model, 1.0, spec)
    reg3 = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, M=3.0, example_inputs=X)
    torch.testing.assert_close(reg3(), spr_penalty(vecs, 0.1, 0.5, 3.0).sum())
    names = ["conv1", "bn1", "conv2", "bn2"]
    reg_map = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, M={n: 3.0 for n in names}, example_inputs=X)
    torch.testing.assert_close(reg_map(), reg3())


def test_zero_channel_gives_zero_penalty_and_finite_gradient():
    model = randomized(ConvBNNet(), seed=11)
    with torch.no_grad():
        for p in (model.conv2.weight, model.bn2.weight, model.bn2.bias):
            p[1] = 0.0
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, example_inputs=X)
    j = next(k for k, g in enumerate(reg.groups_) if g.root_module == "conv2" and g.root_channel == 1)
    assert reg.penalties()[j].item() == 0.0
    reg().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.all(model.conv2.weight.grad[1] == 0)


def test_regulariser_fails_loudly_after_shape_change():
    model = ConvBNNet()
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, example_inputs=torch.randn(1, 3, 8, 8))
    model.conv2.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
    with pytest.raises(RuntimeError, match="changed size"):
        reg()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"model": "net"}, r"`model` must be a torch.nn.Module"),
        ({"alpha": -1.0}, r"`alpha` must be finite and >= 0"),
        ({"lam": float("nan")}, r"`lam` must be finite and >= 0"),
        ({"m_scale": 0.0}, r"`m_scale` must be a finite number > 0"),
        ({"m_scale": -1.0}, r"`m_scale` must be a finite number > 0"),
        ({"m_scale": float("inf")}, r"`m_scale` must be a finite number > 0"),
        ({"example_inputs": None}, r"`example_inputs` is required"),
        ({"M": "huge"}, r"`M` must be 'auto'"),
        ({"M": 0.0}, r"`M` must be a number > 0"),
        ({"M": {"conv1": 1.0}}, r"`M` must give a bound for every penalised layer; missing \['bn1'"),
        ({"M": {"nope": 1.0}}, r"`M` names modules not in the model: \['nope'\]"),
        ({"ignored_layers": ["nope"]}, r"`ignored_layers` names a module not in the model"),
        ({"ignored_layers": ["conv1", "conv2"]}, r"`model` has no prunable channel groups"),
    ],
)
def test_regulariser_rejects_bad_inputs(kwargs, match):
    args = {"model": ConvBNNet(), "alpha": 0.1, "lam": 0.5, "example_inputs": torch.randn(1, 3, 8, 8)} | kwargs
    model = args.pop("model")
    with pytest.raises(ValueError, match=match):
        PerspectiveRegularizer(model, **args)


# ------------------------------------------------------------------------------------------------
# relative=True: the closed form on each group divided by its layer's root-mean-square group norm

# Number of channel groups per layer (dependency group), in the order of expected_groups.
LAYER_SIZES = {"convbn": [4, 5], "resnet": [4, 4, 6, 6], "depthwise": [4, 6]}


def relative_reference(model, name, alpha, lam, detach, bounds0, scale0):
    """SPR of hand-gathered groups divided by a hand-computed per-layer RMS group norm.

    ``bounds0`` are the raw "auto" bounds of each group at construction and ``scale0`` the per-layer
    scales then; relative bounds are their ratio.
    """
    vecs, _ = manual_vectors(model, 1.0, expected_groups(name))
    out_v, out_b = [], []
    for layer, bounds, c0 in zip(_split(vecs, LAYER_SIZES[name]), _split(bounds0, LAYER_SIZES[name]), scale0):
        c = torch.sqrt(sum((v * v).sum() for v in layer) / len(layer))
        c = c.detach() if detach else c
        out_v += [v / c for v in layer]
        out_b += [b / c0 for b in bounds]
    return spr_penalty(out_v, alpha, lam, out_b)


def layer_params(name):
    """Parameter names of the first layer (dependency group) of each case: scaled together below."""
    return {"convbn": ["conv2.weight", "bn2.weight", "bn2.bias"],
            "resnet": ["stem.weight", "bn.weight", "bn.bias", "blk1.c2.weight", "blk1.b2.weight", "blk1.b2.bias"],
            "depthwise": ["pw.weight", "pw.bias", "bn2.weight", "bn2.bias"]}[name]


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("name", list(LAYER_SIZES))
def test_relative_equals_spr_of_explicitly_scaled_weights(name, detach):
    model = randomized(CASES[name][0](), seed=12)
    reg = PerspectiveRegularizer(model, alpha=0.05, lam=1.0, m_scale=1.5, example_inputs=X, relative=True,
                                 detach_scale=detach)
    vecs0, bounds0 = manual_vectors(model, 1.5, expected_groups(name))
    scale0 = [float(torch.sqrt(sum((v.detach() ** 2).sum() for v in layer) / len(layer)))
              for layer in _split(vecs0, LAYER_SIZES[name])]
    assert sorted(reg.scales_.tolist()) == pytest.approx(sorted(scale0), rel=1e-12)
    with torch.no_grad():  # move away from the construction point: bounds must stay those of construction
        for p in model.parameters():
            p.mul_(1.0 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                          dtype=p.dtype))
    expected = relative_reference(model, name, 0.05, 1.0, detach, bounds0, scale0)
    params = list(model.parameters())
    total = reg()
    torch.testing.assert_close(total, expected.sum())
    assert sorted(reg.penalties().tolist()) == pytest.approx(sorted(expected.tolist()), rel=1e-12)
    for a, b in zip(torch.autograd.grad(total, params, allow_unused=True),
                    torch.autograd.grad(expected.sum(), params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def _split(items, sizes):
    out, k = [], 0
    for n in sizes:
        out.append(items[k:k + n])
        k += n
    return out


@pytest.mark.parametrize("name", list(LAYER_SIZES))
def test_relative_penalty_is_invariant_to_scaling_one_layer(name):
    model = randomized(CASES[name][0](), seed=13)
    reg = PerspectiveRegularizer(model, alpha=0.05, lam=1.0, m_scale=1.5, example_inputs=X, relative=True)
    plain = PerspectiveRegularizer(model, alpha=0.05, lam=1.0, m_scale=1.5, example_inputs=X)
    before, before_plain = reg.penalties().detach(), plain.penalties().detach()
    y_before, rel_before = reg.optimal_y(), reg.relative_norms()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname in layer_params(name):  # the layer's filters and BatchNorm affine entries
            params[pname].mul_(3.7)
    torch.testing.assert_close(reg.penalties().detach(), before, rtol=1e-12, atol=0)
    torch.testing.assert_close(reg.optimal_y(), y_before, rtol=1e-12, atol=0)
    torch.testing.assert_close(reg.relative_norms(), rel_before, rtol=1e-12, atol=0)
    assert not torch.allclose(plain.penalties().detach(), before_plain)  # the plain penalty is not invariant


@pytest.mark.parametrize("name", list(LAYER_SIZES))
def test_relative_gradient_is_orthogonal_to_each_layer(name):
    """Euler: a penalty of degree 0 in each layer's weights has <w_L, grad_L R> = 0 when c_L is differentiated."""
    model = randomized(CASES[name][0](), seed=14)
    params = dict(model.named_parameters())
    for detach in (False, True):
        reg = PerspectiveRegularizer(model, alpha=0.05, lam=1.0, m_scale=1.5, example_inputs=X, relative=True,
                                     detach_scale=detach)
        grads = dict(zip(params, torch.autograd.grad(reg(), list(params.values()), allow_unused=True)))
        radial = sum(float((params[p] * grads[p]).sum().detach()) for p in layer_params(name))
        if detach:
            assert radial > 1e-3  # a constant scale leaves the pull that shrinks the layer
        else:
            assert abs(radial) < 1e-12


class _PenaltyOf(nn.Module):
    """Makes the regulariser a function of the model's parameters for functional_call."""

    def __init__(self, model, reg):
        super().__init__()
        self.model, self._reg = model, [reg]

    def forward(self):
        return self._reg[0].penalties()


@pytest.mark.parametrize("m_scale,regime", [(1.5, 3), (8.0, 2)])
def test_relative_gradcheck(m_scale, regime):
    """The differentiated scale gives the true gradient (``detach_scale=True`` deliberately does not;
    its gradient is checked against the explicitly scaled weights with a constant scale above)."""
    model = randomized(ResNet(), seed=15)
    reg = PerspectiveRegularizer(model, alpha=0.05, lam=1.0, m_scale=m_scale, example_inputs=X, relative=True)
    sq, r = reg._penalised_stats()
    t = math.sqrt(0.05 / 1.0) * torch.sqrt(sq.detach())
    inside = (r.detach() > t) if regime == 3 else (r.detach() < t)
    assert bool(inside.all()) and bool((torch.maximum(r, t) < 1).all())  # one regime, away from its edges
    wrapper = _PenaltyOf(model, reg)
    names = [n for n, _ in wrapper.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())

    def f(*tensors):
        return torch.func.functional_call(wrapper, dict(zip(names, tensors)), ())

    assert torch.autograd.gradcheck(f, values, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_relative_norms_have_unit_mean_square_per_layer():
    model = randomized(ResNet(), seed=16)
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, example_inputs=X)
    rel, norms = reg.relative_norms(), reg.group_norms()
    layer = torch.tensor(reg.layer_of_group_.tolist())
    for k in range(reg.n_layers):
        assert float((rel[layer == k] ** 2).mean()) == pytest.approx(1.0, rel=1e-12)
        ratio = norms[layer == k] / rel[layer == k]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12)
    assert sorted(Counter(reg.layer_of_group_.tolist()).values()) == sorted(LAYER_SIZES["resnet"])


def test_relative_zero_layer_is_finite_and_auto_bounds_in_relative_units():
    model = randomized(ConvBNNet(), seed=17)
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, m_scale=2.0, example_inputs=X, relative=True)
    k = int(reg.layer_of_group_[[j for j, g in enumerate(reg.groups_) if g.root_module == "conv2"][0]])
    peak = max(model.bn2.weight.abs().max().item(), model.bn2.bias.abs().max().item())
    assert reg.bounds_["bn2"] == pytest.approx(2.0 * peak / reg.scales_[k], rel=1e-12)
    with torch.no_grad():
        for p in (model.conv2.weight, model.bn2.weight, model.bn2.bias):
            p.zero_()
    pen = reg.penalties()
    conv2 = torch.as_tensor(reg.layer_of_group_ == k)
    assert torch.all(pen[conv2] == 0) and torch.all(reg.relative_norms()[conv2] == 0)
    pen.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kwargs,match", [({"relative": "yes"}, r"`relative` must be True or False"),
                                          ({"detach_scale": 1}, r"`detach_scale` must be True or False")])
def test_relative_rejects_bad_flags(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerspectiveRegularizer(ConvBNNet(), alpha=0.1, lam=0.5, example_inputs=torch.randn(1, 3, 8, 8), **kwargs)
