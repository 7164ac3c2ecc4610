"""The network benchmark's group-norm baseline: the regulariser hook, its cached training, its pruning step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import benchmarks.common as common
from benchmarks.common import group_norm_regularisation, group_norm_trained
from orprune.examples.baselines import _pruned


class Net(nn.Module):
    """conv-BN-ReLU twice with a residual add and a classifier: coupled groups as in ResNet-20."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.head(y.mean((2, 3)))


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    for bn in (model.bn0, model.bn1, model.bn2):
        bn.weight.data.uniform_(0.2, 2.0)  # distinct group norms
    return model.eval()


def zero_grad_step(model: nn.Module) -> None:
    """One plain SGD step (lr 1) with all gradients zero: only the regulariser moves the weights."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()


def test_regulariser_shrinks_each_group_by_its_rank_and_only_inside_the_block():
    model, reg = net(), 1e-3
    before = model.bn1.weight.detach().clone()
    with group_norm_regularisation(model, torch.zeros(1, 1, 6, 6), reg):
        zero_grad_step(model)
    # bn1's channels form conv1's groups alone: w <- w - reg * gamma * w with gamma in [1, 16], 1 for the
    # strongest group and 16 for the weakest (torch-pruning's alpha = 2**4)
    gamma = (1 - model.bn1.weight.detach() / before) / reg
    assert gamma.min().item() == pytest.approx(1.0, rel=1e-3)
    assert gamma.max().item() == pytest.approx(16.0, rel=1e-3)
    after = copy.deepcopy(model.state_dict())
    zero_grad_step(model)  # the hook is gone: zero gradients change nothing
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, after[name], rtol=0, atol=0)


def test_group_norm_pruner_prunes_as_the_magnitude_baseline():
    # The benchmark bisects GroupNormPruner's MACs target with orprune.examples.baselines' magnitude pruner: the two
    # must remove the same channels at every ratio.
    example = torch.zeros(1, 1, 6, 6)
    for ratio in (0.25, 0.5, 0.75):
        model = net()
        tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), reg=1e-3,
                                  pruning_ratio=ratio, ignored_layers=[model.head]).step()
        baseline = _pruned(net(), example, "magnitude", ratio, None)
        assert model.state_dict().keys() == baseline.state_dict().keys()
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, baseline.state_dict()[name], rtol=0, atol=0)
        assert model.conv1.out_channels < 12


def test_trained_copy_is_cached_and_keyed_by_data(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    torch.manual_seed(1)
    images, labels = torch.randn(32, 1, 6, 6), torch.randint(0, 10, (32,))
    model = net()
    start = copy.deepcopy(model.state_dict())
    first, meta = group_norm_trained(model, images, labels, reg=1e-3, epochs=1, lr=0.01, log=None)
    for name, value in model.state_dict().items():  # the argument is not trained
        torch.testing.assert_close(value, start[name], rtol=0, atol=0)
    assert not torch.equal(first.conv1.weight, model.conv1.weight)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and meta["train_seconds"] > 0
    again, meta_again = group_norm_trained(model, images, labels, reg=1e-3, epochs=1, lr=0.01, log=None)
    assert meta_again == meta
    for name, value in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0)
    group_norm_trained(model, images, labels.roll(1), reg=1e-3, epochs=1, lr=0.01, log=None)
    group_norm_trained(model, images, labels, reg=2e-3, epochs=1, lr=0.01, log=None)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_bad_reg():
    with pytest.raises(ValueError, match="`reg` must be > 0"):
        group_norm_trained(net(), torch.zeros(2, 1, 6, 6), torch.zeros(2, dtype=torch.long), reg=0.0, epochs=1,
                           lr=0.01)

