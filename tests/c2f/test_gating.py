"""Coarse-to-fine gating: band-stop gates, the budget penalty, hardening, hard-masked layers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orprune import LayerProblem, select_hierarchical
from orprune.c2f import CoarseToFineGating, band_stop, finetune_with_masks, split_budget, train_with_gating
from orprune.c2f.hardening import harden_layer, score_problem
from orprune.layer.nm import nm_refit


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def small(seed=0):
    torch.manual_seed(seed)
    return Small()


def test_band_stop_is_a_band_stop():
    u = torch.linspace(-3, 3, 601)
    t = torch.tensor(1.0)
    b = band_stop(u, t, 0.1)
    assert torch.all(b >= 2 * torch.sigmoid(-t / 0.1) - 1e-7) and torch.all(b <= 1 + 1e-6)
    assert torch.allclose(b, band_stop(-u, t, 0.1))  # symmetric
    right = b[u >= 0]
    assert torch.all(right[1:] >= right[:-1] - 1e-7)  # increasing in |u|
    assert float(band_stop(torch.tensor(0.2), t, 0.01)) < 1e-6 and float(band_stop(torch.tensor(1.8), t, 0.01)) > 1 - 1e-6


@pytest.mark.parametrize("target", [0.0, 0.13, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_masks_meet_the_budget_and_entry_below_group(target, seed):
    model = small(seed)
    gating = CoarseToFineGating(model, target, temperature=0.3)
    torch.manual_seed(seed)
    with torch.no_grad():  # random thresholds: some channels and entries off
        for p in gating.gate_parameters():
            p.copy_(torch.log(torch.rand(()) * 1.5 + 0.05))
    masks = gating.harden()
    assert masks.kept == round(target * gating.total) == sum(m.sum() for m in masks.masks.values())
    assert masks.total == sum(p.numel() for n, p in model.named_parameters() if n.endswith("original"))
    for name in gating.layer_names:
        mask, groups = masks.masks[name], masks.groups[name]
        assert mask.shape == tuple(gating.raw_weight(name).shape)
        assert not mask[:, ~groups].any()  # entry <= group
        assert masks.n_groups[name] == groups.sum() and masks.entries[name] == mask.sum()
        assert np.array_equal(gating.gate(name).hard_mask.numpy().astype(bool), mask)


def test_split_budget_is_exact_and_capped():
    rng = np.random.default_rng(0)
    for _ in range(200):
        caps = rng.integers(0, 30, size=rng.integers(1, 6))
        total = int(rng.integers(0, caps.sum() + 1))
        weights = rng.random(len(caps)) * (rng.random(len(caps)) < 0.8)
        out = split_budget(total, weights, caps)
        assert out.sum() == total and np.all(out <= caps) and np.all(out >= 0)
    assert list(split_budget(10, np.array([1.0, 1.0]), np.array([3, 20]))) == [3, 7]
    with pytest.raises(ValueError, match="`total`"):
        split_budget(11, np.ones(2), np.array([5, 5]))


def test_score_hardening_keeps_the_top_scores_within_the_kept_groups():
    # with every group allowed, the identity-Gram hierarchical selection is the top-K scores; with k groups it is
    # at least as good as the k groups of largest score energy with their own top-K
    rng = np.random.default_rng(3)
    scores = rng.random((8, 3))
    for K in range(0, 25):
        mask, groups, _, _ = harden_layer(scores, 8, K, 1)
        assert mask.sum() == K
        top = np.sort(scores.ravel())[::-1][:K]
        assert np.isclose(np.sum(scores[mask] ** 2), np.sum(top**2))
    for k, K in itertools.product(range(1, 5), range(1, 10)):
        if K > 3 * k:
            continue
        mask, groups, _, _ = harden_layer(scores, k, K, 1)
        assert groups.sum() == k and mask.sum() == K and not mask[~groups].any()
        exact = select_hierarchical(score_problem(scores, 1), k, K, solver="exact")
        assert np.sum(scores[mask] ** 2) <= np.sum(scores[exact.mask] ** 2) + 1e-9  # exact is the best


def test_data_hardening_uses_the_mip_and_refits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    X = torch.randn(200, 5)
    Y = X @ torch.randn(5, 3)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 5))
    prob = LayerProblem.from_arrays(X.double().numpy(), Y.double().numpy(), ridge=1e-6)
    gating = CoarseToFineGating(model, 7 / 15, entry_threshold=1e-3, group_threshold=1e-3)
    masks = gating.harden(problems={"0": prob}, solver="exact", refit=True)
    assert masks.kept == 7 and masks.source == "data"
    k = masks.n_groups["0"]
    exact = select_hierarchical(prob, k, 7, solver="exact")
    assert np.array_equal(masks.masks["0"], exact.mask.T)
    W = gating.raw_weight("0").detach().double().numpy()
    assert np.allclose(W * masks.masks["0"], exact.weights.T, atol=1e-5)
    with pytest.raises(ValueError, match="problems"):
        gating.harden(problems={"0": LayerProblem.from_arrays(X[:, :4].numpy(), Y.numpy())})


@pytest.mark.parametrize("layer", ["conv", "fc1"])
def test_hard_gated_layer_equals_the_masked_dense_layer(layer):
    model = small()
    gating = CoarseToFineGating(model, 0.4, temperature=0.2)
    masks = gating.harden()
    module = dict(model.named_modules())[layer]
    raw = gating.raw_weight(layer).detach()
    mask = torch.as_tensor(masks.masks[layer].copy(), dtype=raw.dtype)
    x = torch.randn(4, 3, 4, 4) if layer == "conv" else torch.randn(4, 96)
    dense = F.conv2d(x, raw * mask, module.bias, padding=1) if layer == "conv" else F.linear(x, raw * mask, module.bias)
    assert torch.allclose(module(x), dense, atol=1e-6)
    inputs = torch.randn(2, 3, 4, 4)
    before = model(inputs)
    gating.remove()
    assert not gating.hard
    assert type(module.weight) is nn.Parameter and torch.allclose(model(inputs), before)
    assert torch.equal(module.weight.detach() != 0, (raw * mask) != 0)


def test_penalty_is_differentiable_and_drives_the_kept_fraction_to_the_budget():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4).double()
    gating = CoarseToFineGating(layer, 0.3, temperature=0.3)
    raw = gating.raw_weight("")
    gate = gating.gate("")

    def penalty(w, a, b):
        with torch.no_grad():
            raw.copy_(w), gate.log_entry.copy_(a), gate.log_group.copy_(b)
        return gating.penalty()

    # gradient of the penalty against central differences, in the weights and both thresholds
    w0, a0, b0 = raw.detach().clone(), gate.log_entry.detach().clone(), gate.log_group.detach().clone()
    value = penalty(w0, a0, b0)
    grads = torch.autograd.grad(value, [raw, gate.log_entry, gate.log_group])
    eps = 1e-6
    for index in [(0, 0), (2, 3), (3, 5)]:
        d = torch.zeros_like(w0)
        d[index] = eps
        numeric = (penalty(w0 + d, a0, b0) - penalty(w0 - d, a0, b0)) / (2 * eps)
        assert torch.isclose(grads[0][index], numeric.detach(), rtol=1e-4, atol=1e-9)
    for k, (a, b) in enumerate([(a0 + eps, b0), (a0, b0 + eps)]):
        numeric = (penalty(w0, a, b) - penalty(w0, 2 * a0 - a, 2 * b0 - b)) / (2 * eps)
        assert torch.isclose(grads[1 + k], numeric.detach(), rtol=1e-4, atol=1e-9)
    penalty(w0, a0, b0)
    # minimising the penalty alone: the soft kept fraction moves from ~1 to the target
    start = gating.kept_fraction().item()
    optimizer = torch.optim.Adam(gating.gate_parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        gating.penalty().backward()
        optimizer.step()
    assert start > 0.9 and abs(gating.kept_fraction().item() - 0.3) < 0.01


def test_training_end_to_end_meets_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    X = torch.randn(256, 10)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    result = train_with_gating(model, X, y, target=0.25, epochs=20, finetune_epochs=2, strength=20.0, gate_lr=0.1,
                               batch_size=32)
    assert result.masks.kept == round(0.25 * (160 + 48))
    assert abs(result.soft_kept_fraction - 0.25) < 0.05
    assert result.gating.hard and result.history[-1]["temperature"] == pytest.approx(0.02)
    assert type(model[0].weight) is nn.Parameter  # the input model is untouched
    for name, mask in result.masks.masks.items():
        module = dict(result.model.named_modules())[name]
        assert torch.equal(module.weight.detach() != 0, torch.as_tensor(mask.copy()) & (gating_raw(result, name) != 0))


def test_training_with_data_hardening_reads_the_trained_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 2, bias=False))
    X = torch.randn(64, 4)
    y = (X[:, 0] > 0).long()
    seen = {}

    def problems(gated):
        hidden = torch.relu(gated[0](X)).detach().double().numpy()
        w = gated[2].weight.detach().double().numpy()  # the soft-masked weight of the trained layer
        seen["prob"] = LayerProblem.from_arrays(hidden, hidden @ w.T, ridge=1e-6)
        return {"2": seen["prob"]}

    result = train_with_gating(model, X, y, target=0.5, epochs=2, batch_size=16, layers=["2"], problems=problems)
    assert result.masks.source == "data" and result.masks.kept == 6
    mask = result.masks.masks["2"]
    assert not mask[:, ~result.masks.groups["2"]].any()
    # the written weights are the least-squares refit of the final mask on the trained network's statistics
    assert np.allclose(result.masks.weights["2"], nm_refit(seen["prob"], mask.T)[0].T, atol=1e-9)
    assert np.allclose(result.model[2].weight.detach().numpy(), result.masks.weights["2"] * mask, atol=1e-5)


def test_fixed_masks_stay_fixed_during_finetuning():
    model = small()
    gating = CoarseToFineGating(model, 0.5)
    with pytest.raises(ValueError, match="hard masks"):
        finetune_with_masks(model, gating, torch.randn(4, 3, 4, 4), torch.zeros(4, dtype=torch.long), epochs=1)
    rng = np.random.default_rng(0)
    masks = {n: rng.random(tuple(gating.raw_weight(n).shape)) < 0.3 for n in gating.layer_names}
    gating.fix_masks(masks)
    X, y = torch.randn(64, 3, 4, 4), torch.randint(0, 5, (64,))
    finetune_with_masks(model, gating, X, y, epochs=2, lr=1e-2, batch_size=16)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert torch.all(modules[name].weight.detach()[torch.as_tensor(~mask)] == 0)
    with pytest.raises(ValueError, match="`masks`"):
        gating.fix_masks({"conv": masks["conv"]})
    with pytest.raises(ValueError, match="shape"):
        gating.fix_masks({**masks, "fc2": np.ones((2, 2))})


def gating_raw(result, name):
    return result.gating.raw_weight(name).detach()


def test_bad_inputs_raise():
    model = small()
    with pytest.raises(ValueError, match="`target`"):
        CoarseToFineGating(model, 1.5)
    with pytest.raises(ValueError, match="`ignored_layers`"):
        CoarseToFineGating(model, 0.5, ignored_layers=["nope"])
    with pytest.raises(ValueError, match="`layers`"):
        CoarseToFineGating(model, 0.5, layers=["nope"])
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        CoarseToFineGating(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="`entry_threshold`"):
        CoarseToFineGating(model, 0.5, entry_threshold=0)
    with pytest.raises(ValueError, match="`model`"):
        CoarseToFineGating("model", 0.5)
    gating = CoarseToFineGating(model, 0.5)
    with pytest.raises(ValueError, match="`temperature`"):
        gating.temperature = -1.0
    with pytest.raises(ValueError, match="gated twice"):
        CoarseToFineGating(model, 0.5)
    with pytest.raises(ValueError, match="`solver`"):
        gating.harden(solver="lp")
    with pytest.raises(ValueError, match="`problems`"):
        gating.harden(problems={"nope": None})
    X, y = torch.randn(8, 3, 4, 4), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="`epochs`"):
        train_with_gating(small(), X, y, target=0.5, epochs=0)
    with pytest.raises(ValueError, match="`temperature`"):
        train_with_gating(small(), X, y, target=0.5, temperature=(0.5,))
    with pytest.raises(ValueError, match="`images`"):
        train_with_gating(small(), X, y[:3], target=0.5)
