"""Tests of the threshold search and channel removal after SPR training (orprune.spr.pruning).

References are independent of the search's own masking: the masked model here zeroes only the
producers' filters and BatchNorm entries (a channel of a BN + ReLU net is then exactly zero), and
accuracies are recomputed with plain evaluation.
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import orprune
from orprune.cli.spr import add_spr_arguments, run_spr
from orprune.examples.datasets import load_digits
from orprune.spr.pruning import prune_by_threshold
from orprune.spr.regularizer import PerspectiveRegularizer
from orprune.spr.training import train_with_spr
from orprune.training import evaluate, train
from tests.models import CifarResNet


class FlatNet(nn.Module):
    """conv-BN-ReLU x2, then a flatten into a Linear (a consumer with 16 inputs per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.body(x), 1))


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    x, y = load_digits("train")
    return x[:1000], y[:1000], x[1000:], y[1000:]


def _trained(kind: str, digits, strength: float = 0.05):
    x, y, _, _ = digits
    torch.manual_seed(0)
    # ResNet-8: one basic block per stage, residual streams coupled across blocks by the adds
    model = FlatNet() if kind == "flat" else CifarResNet(8, 10, in_channels=1, width=0.25)
    reg = PerspectiveRegularizer(model.eval(), alpha=0.5, lam=0.5, m_scale=4.0, example_inputs=x[:1])
    train(model, x, y, epochs=3, regularizer=reg, regularizer_strength=strength, progress=False)
    return model, reg


@pytest.fixture(scope="module", params=["resnet", "flat"])
def trained(request, digits):
    return _trained(request.param, digits)


def _producer_params(model: nn.Module, group):
    """(member, parameter name, parameter) of every producer ("out") entry of a channel group."""
    for member in group.members:
        if member.dim != "out":
            continue
        module = model.get_submodule(member.module)
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if param is not None:
                yield member, name, param


def _zero_producers(model: nn.Module, reg: PerspectiveRegularizer, removed) -> nn.Module:
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for j in removed:
            for member, _, param in _producer_params(masked, reg.groups_[j]):
                param[list(member.indices)] = 0.0
    return masked.eval()


def test_removed_model_equals_masked_model(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    res = prune_by_threshold(model, reg, vx, vy, tolerance=0.05)
    assert res.n_removed > 0
    masked = _zero_producers(model, reg, res.removed)
    with torch.no_grad():
        expected, got = masked(vx), res.model(vx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert res.params_after < res.params_before and res.macs_after < res.macs_before
    assert sum(p.numel() for p in res.model.parameters()) < sum(p.numel() for p in model.parameters())


def test_accuracy_drop_within_tolerance_and_reported_honestly(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    for tol in (0.0, 0.01, 0.05):
        res = prune_by_threshold(model, reg, vx, vy, tolerance=tol)
        assert res.accuracy_before == evaluate(model, vx, vy)
        assert res.accuracy_after == evaluate(res.model, vx, vy)
        assert res.accuracy_after >= res.accuracy_before - tol - 1e-12


def test_threshold_is_locally_maximal(trained, digits):
    """Removing the next norm level too breaks the tolerance (or nothing more is removable)."""
    model, reg = trained
    _, _, vx, vy = digits
    tol = 0.02
    res = prune_by_threshold(model, reg, vx, vy, tolerance=tol)
    norms = reg.group_norms().double().numpy()
    keep = {}
    for j, g in enumerate(reg.groups_):  # the largest-norm channel of each root layer stays
        if g.dependency_group not in keep or norms[j] > norms[keep[g.dependency_group]]:
            keep[g.dependency_group] = j
    removable = sorted(set(range(len(norms))) - set(keep.values()), key=lambda j: norms[j])
    assert set(res.removed) == {j for j in removable if res.threshold is not None and norms[j] <= res.threshold}
    rest = [norms[j] for j in removable if j not in res.removed]
    if rest:
        nxt = min(rest)
        bigger = [j for j in removable if norms[j] <= nxt]
        acc = evaluate(_zero_producers(model, reg, bigger), vx, vy)
        assert acc < res.accuracy_before - tol


def test_larger_tolerance_never_removes_fewer(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    results = [prune_by_threshold(model, reg, vx, vy, tolerance=t) for t in (0.0, 0.02, 0.2, 1.0)]
    for small, large in zip(results, results[1:]):
        assert set(small.removed) <= set(large.removed)
    # with tolerance 1 every channel but one per root layer goes
    roots = {g.dependency_group for g in reg.groups_}
    assert results[-1].n_removed == len(reg.groups_) - len(roots)
    assert all(removed < total for _, removed, total in results[-1].removed_per_layer)
    with torch.no_grad():
        assert results[-1].model(vx[:2]).shape == (2, 10)


def test_zero_groups_are_removed_at_zero_tolerance(digits):
    """Groups with zero weights tie at norm 0, form the first cut, and cost no accuracy."""
    model, _ = _trained("flat", digits, strength=0.0)
    x, _, vx, vy = digits
    zeroed = copy.deepcopy(model)
    reg = PerspectiveRegularizer(zeroed, alpha=0.5, lam=0.5, example_inputs=x[:1])
    first = [j for j, g in enumerate(reg.groups_) if g.root_module == "body.0"][:3]
    zeroed = _zero_producers(zeroed, reg, first)
    reg = PerspectiveRegularizer(zeroed, alpha=0.5, lam=0.5, example_inputs=x[:1])
    assert all(float(reg.group_norms()[j]) == 0.0 for j in first)
    res = prune_by_threshold(zeroed, reg, vx, vy, tolerance=0.0)
    assert set(first) <= set(res.removed)
    assert res.accuracy_after >= res.accuracy_before


def test_input_model_is_not_modified(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_by_threshold(model, reg, vx, vy, tolerance=1.0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_inputs(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    with pytest.raises(ValueError, match="`tolerance` must be a finite number >= 0"):
        prune_by_threshold(model, reg, vx, vy, tolerance=-0.01)
    with pytest.raises(ValueError, match="`tolerance`"):
        prune_by_threshold(model, reg, vx, vy, tolerance=float("nan"))
    with pytest.raises(ValueError, match="`val_images` must be a non-empty batch"):
        prune_by_threshold(model, reg, vx[:0], vy[:0])
    with pytest.raises(ValueError, match="`val_labels` must be integer labels"):
        prune_by_threshold(model, reg, vx, vy[:-1])
    with pytest.raises(ValueError, match="`val_labels` must be integer labels"):
        prune_by_threshold(model, reg, vx, vy.float())
    with pytest.raises(ValueError, match="built for another model"):
        prune_by_threshold(copy.deepcopy(model), reg, vx, vy)
    with pytest.raises(ValueError, match="`regularizer` must be a PerspectiveRegularizer"):
        prune_by_threshold(model, None, vx, vy)
    with pytest.raises(ValueError, match="`batch_size`"):
        prune_by_threshold(model, reg, vx, vy, batch_size=0)


def test_stale_regularizer_after_pruning_is_rejected(digits):
    model, reg = _trained("flat", digits, strength=0.0)
    _, _, vx, vy = digits
    res = prune_by_threshold(model, reg, vx, vy, tolerance=1.0)
    with pytest.raises(ValueError, match="built for another model"):
        prune_by_threshold(res.model, reg, vx, vy)


def test_train_with_spr_end_to_end(digits):
    x, y, vx, vy = digits
    torch.manual_seed(0)
    model = FlatNet()
    before = copy.deepcopy(model.state_dict())
    out = train_with_spr(model, x, y, vx, vy, epochs=2, finetune_epochs=0.5, tolerance=0.02)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out.regularizer.n_groups == 12
    assert out.pruning.accuracy_after >= out.pruning.accuracy_before - 0.02 - 1e-12
    assert out.accuracy_finetuned == evaluate(out.model, vx, vy)
    # fine-tuning changes weights, not the architecture
    assert [p.shape for p in out.model.parameters()] == [p.shape for p in out.pruning.model.parameters()]
    with pytest.raises(ValueError, match="`strength`"):
        train_with_spr(model, x, y, vx, vy, strength=-1.0)
    with pytest.raises(ValueError, match="`score`"):
        train_with_spr(model, x, y, vx, vy, score="size")


def test_train_with_relative_spr_thresholds_relative_norms(digits):
    x, y, vx, vy = digits
    torch.manual_seed(0)
    out = train_with_spr(FlatNet(), x, y, vx, vy, epochs=1, tolerance=0.02, relative=True, score="relative_norm")
    assert out.regularizer.relative and out.pruning.score == "relative_norm"
    # the scores are the trained model's layer-relative norms, not its raw norms
    np.testing.assert_allclose(out.pruning.scores, out.regularizer.relative_norms().double().numpy(), rtol=1e-6)
    assert not np.allclose(out.pruning.scores, out.pruning.norms)
    assert out.pruning.accuracy_after >= out.pruning.accuracy_before - 0.02 - 1e-12


def test_cli_function_writes_model_and_report(tmp_path):
    parser = add_spr_arguments(argparse.ArgumentParser())
    out = tmp_path / "pruned.pt"
    args = parser.parse_args(["--model", "small_cnn", "--dataset", "digits", "--epochs", "0.5", "--train-size",
                              "500", "--val-size", "300", "--tolerance", "0.02", "--output", str(out), "--quiet"])
    assert run_spr(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    model = orprune.load(out)  # SmallCNN() narrowed to the saved widths
    assert report["params_after"] == sum(p.numel() for p in model.parameters())
    assert report["val_accuracy_after"] >= report["val_accuracy_before"] - 0.02 - 1e-12
    assert report["train_images"] == 500 and report["val_images"] == 300
    assert np.isclose(report["test_accuracy_final"], evaluate(model, *load_digits("test")))


def _optimal_y_reference(model: nn.Module, reg: PerspectiveRegularizer) -> np.ndarray:
    """y* = min(1, max(max_i |w_i| / M_i, sqrt(alpha / lam) ||w||)) from each group's producer entries."""
    out = []
    for g in reg.groups_:
        entries = {}  # (module, parameter) -> (values, bound): each tensor entry counted once
        for member, name, param in _producer_params(model, g):
            values = param.detach()[list(member.indices)].reshape(-1).double().numpy()
            entries[(member.module, name)] = (values, reg.bounds_[member.module])
        w = np.concatenate([v for v, _ in entries.values()])
        r = max(float(np.abs(v).max()) / bound for v, bound in entries.values())
        out.append(min(1.0, max(r, np.sqrt(reg.alpha / reg.lam) * np.linalg.norm(w))))
    return np.array(out)


def test_optimal_y_score_thresholds_the_relaxed_indicator(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    tol = 0.02
    res = prune_by_threshold(model, reg, vx, vy, tolerance=tol, score="optimal_y")
    y = _optimal_y_reference(model, reg)
    np.testing.assert_allclose(res.scores, y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.norms, reg.group_norms().double().numpy())
    y = np.asarray(res.scores)  # checked above; its own rounding decides ties and the protected group
    keep = {}
    for j, g in enumerate(reg.groups_):  # the largest-y* channel of each root layer stays
        if g.dependency_group not in keep or y[j] > y[keep[g.dependency_group]]:
            keep[g.dependency_group] = j
    removable = set(range(len(y))) - set(keep.values())
    assert res.n_removed > 0
    assert set(res.removed) == {j for j in removable if y[j] <= res.threshold}
    assert res.accuracy_after == evaluate(res.model, vx, vy)
    assert res.accuracy_after >= res.accuracy_before - tol - 1e-12


def test_default_score_is_the_norm(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    default = prune_by_threshold(model, reg, vx, vy, tolerance=0.02)
    explicit = prune_by_threshold(model, reg, vx, vy, tolerance=0.02, score="norm")
    assert default.score == "norm" and default.removed == explicit.removed
    assert np.array_equal(default.scores, default.norms)
    with pytest.raises(ValueError, match=r"`score` must be one of \['norm', 'relative_norm', 'optimal_y'\]"):
        prune_by_threshold(model, reg, vx, vy, score="y")


def _relative_norm_reference(model: nn.Module, reg: PerspectiveRegularizer) -> np.ndarray:
    """||w_j|| / sqrt(mean of ||w_k||^2 over the groups k of j's dependency group), from producer entries."""
    norms = []
    for g in reg.groups_:
        entries = {(m.module, name): param.detach()[list(m.indices)].reshape(-1).double().numpy()
                   for m, name, param in _producer_params(model, g)}
        norms.append(np.linalg.norm(np.concatenate(list(entries.values()))))
    norms = np.array(norms)
    layer = np.array([g.dependency_group for g in reg.groups_])
    rms = {d: np.sqrt(np.mean(norms[layer == d] ** 2)) for d in set(layer.tolist())}
    return norms / np.array([rms[d] for d in layer])


def test_relative_norm_score_thresholds_layer_relative_norms(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    tol = 0.02
    res = prune_by_threshold(model, reg, vx, vy, tolerance=tol, score="relative_norm")
    np.testing.assert_allclose(res.scores, _relative_norm_reference(model, reg), rtol=1e-5)
    rel = np.asarray(res.scores)
    keep = {}
    for j, g in enumerate(reg.groups_):
        if g.dependency_group not in keep or rel[j] > rel[keep[g.dependency_group]]:
            keep[g.dependency_group] = j
    removable = set(range(len(rel))) - set(keep.values())
    expected = set() if res.threshold is None else {j for j in removable if rel[j] <= res.threshold}
    assert set(res.removed) == expected
    assert res.accuracy_after >= res.accuracy_before - tol - 1e-12


def test_reference_accuracy_is_a_shifted_tolerance(trained, digits):
    """Floor ref - eps equals base - (eps + base - ref): the same search as that own-model tolerance."""
    model, reg = trained
    _, _, vx, vy = digits
    base = evaluate(model, vx, vy)
    n = len(vy)
    default = prune_by_threshold(model, reg, vx, vy, tolerance=0.02)
    assert default.reference_accuracy == default.accuracy_before and default.within_tolerance
    for shift, tol in ((3, 0.03), (-4, 0.01), (0, 0.02)):  # reference base + shift / n (whole images)
        ref = base + shift / n
        got = prune_by_threshold(model, reg, vx, vy, tolerance=tol, reference_accuracy=ref)
        same = prune_by_threshold(model, reg, vx, vy, tolerance=tol - shift / n)
        assert got.removed == same.removed and got.accuracy_after == same.accuracy_after
        assert got.reference_accuracy == ref and got.accuracy_before == base
        assert got.within_tolerance and got.accuracy_after >= ref - tol - 1e-12
        assert got.accuracy_after == evaluate(got.model, vx, vy)


def test_reference_above_reach_removes_nothing(trained, digits):
    model, reg = trained
    _, _, vx, vy = digits
    base = evaluate(model, vx, vy)
    ref = min(1.0, base + 0.05)
    res = prune_by_threshold(model, reg, vx, vy, tolerance=0.01, reference_accuracy=ref)
    assert res.n_removed == 0 and res.threshold is None and not res.within_tolerance
    assert res.accuracy_after == base and res.macs_after == res.macs_before
    assert "not met" in res.summary()
    # a larger tolerance that reaches the model again behaves as the shifted own-model tolerance
    wide = prune_by_threshold(model, reg, vx, vy, tolerance=ref - base + 0.01, reference_accuracy=ref)
    assert wide.within_tolerance
    assert set(res.removed) <= set(wide.removed)


@pytest.mark.parametrize("bad", [1.5, -0.1, True, float("nan"), "0.9"])
def test_reference_accuracy_rejects_bad_values(trained, digits, bad):
    model, reg = trained
    _, _, vx, vy = digits
    with pytest.raises(ValueError, match="`reference_accuracy` must be None or an accuracy fraction in"):
        prune_by_threshold(model, reg, vx, vy, reference_accuracy=bad)


def test_train_memory_format_is_opt_in_and_restored(digits):
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = FlatNet()
    with pytest.raises(ValueError, match="`channels_last` must be True or False"):
        train(model, x[:64], y[:64], epochs=1, channels_last="yes", progress=False)
    for channels_last in (False, True):
        trained = train(FlatNet(), x[:256], y[:256], epochs=1, channels_last=channels_last, progress=False)
        weights = [m.weight for m in trained.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
        assert weights and all(w.is_contiguous() for w in weights) and not trained.training
