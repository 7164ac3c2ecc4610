"""Factorized surgery: the two-layer form computes what the reconstructed single layer computes."""

import numpy as np
import pytest
import torch
from torch import nn

from orprune import LayerFactors, apply_factorization, following_norms, reconstructed_copy
from orprune.network.factorization import balanced, factorizable_layers, factorized_layer
from orprune.network.graph import weight_matrix


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, (3, 2), padding=(1, 0), dilation=(1, 2), bias=True)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.depthwise(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def model():
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn1.running_mean.uniform_(-1, 1)
        net.bn1.running_var.uniform_(0.5, 2)
    return net.eval()


def random_factors(net, name, rank, rng, bias=True):
    n, m = weight_matrix(net.get_submodule(name)).shape
    return LayerFactors(rng.normal(size=(n, rank)), rng.normal(size=(rank, m)),
                        rng.normal(size=m) if bias else None)


def test_factorizable_layers_skip_depthwise_and_ignored():
    net = model()
    assert factorizable_layers(net) == ["conv1", "conv2", "fc"]
    assert factorizable_layers(net, ignored_layers=["fc", net.conv1]) == ["conv2"]
    assert following_norms(net, torch.zeros(1, 3, 12, 12, dtype=torch.double)) == {"conv1": "bn1"}


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_factorized_equals_reconstructed(rank, bias):
    net, rng = model(), np.random.default_rng(rank)
    x = torch.randn(4, 3, 12, 12, dtype=torch.double)
    factors = {name: random_factors(net, name, rank, rng, bias) for name in ("conv1", "conv2", "fc")}
    norms = following_norms(net, x[:1])
    for fold in (None, norms):
        factorized = apply_factorization(net, factors, fold)
        reconstructed = reconstructed_copy(net, factors, fold)
        assert isinstance(factorized.conv1, nn.Sequential) and isinstance(reconstructed.conv1, nn.Conv2d)
        assert factorized.conv1[0].out_channels == rank and factorized.conv2[0].dilation == (1, 2)
        assert factorized.fc[0].out_features == rank
        torch.testing.assert_close(factorized(x), reconstructed(x), rtol=1e-10, atol=1e-10)
        # a bias of the bias-free conv1 goes into its BatchNorm when folding, else into the 1x1 conv
        assert (factorized.conv1[1].bias is not None) == (bias and fold is None)
    assert isinstance(net.conv1, nn.Conv2d) and net.conv1.bias is None  # the input model is untouched


def test_full_rank_factors_of_the_weights_reproduce_the_model():
    net = model()
    x = torch.randn(2, 3, 10, 10, dtype=torch.double)
    factors = {}
    for name in ("conv1", "conv2", "fc"):
        u, s, vt = torch.linalg.svd(weight_matrix(net.get_submodule(name)), full_matrices=False)
        factors[name] = LayerFactors(u * s, vt)
    torch.testing.assert_close(apply_factorization(net, factors)(x), net(x), rtol=1e-10, atol=1e-10)


def test_training_flag_and_dtype_are_kept():
    net = model().train()
    layer = factorized_layer(net.conv2, random_factors(net, "conv2", 2, np.random.default_rng(0)))
    assert layer.training and layer[0].weight.dtype == torch.double


def test_bad_inputs():
    net, rng = model(), np.random.default_rng(0)
    with pytest.raises(ValueError, match="share a rank"):
        LayerFactors(np.zeros((4, 2)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="`bias` must have 5 entries"):
        LayerFactors(np.zeros((4, 2)), np.zeros((2, 5)), np.zeros(4))
    with pytest.raises(ValueError, match="`left` must be finite"):
        LayerFactors(np.full((4, 2), np.nan), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="not a module"):
        apply_factorization(net, {"nope": random_factors(net, "fc", 2, rng)})
    with pytest.raises(ValueError, match="groups=1"):
        apply_factorization(net, {"depthwise": random_factors(net, "fc", 2, rng)})
    with pytest.raises(ValueError, match="the layer needs"):
        apply_factorization(net, {"conv1": random_factors(net, "fc", 2, rng)})


def test_the_surgery_writes_the_balanced_split_of_the_same_map():
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(18, 3, generator=gen, dtype=torch.float64) * 1e-3
    right = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 1e3
    right[1] = 0.0  # a zero component stays as it is
    a, b = balanced(left, right)
    torch.testing.assert_close(a @ b, left @ right)
    torch.testing.assert_close(a.norm(dim=0)[[0, 2]], b.norm(dim=1)[[0, 2]])
    torch.testing.assert_close(a[:, 1], left[:, 1])
    conv = torch.nn.Conv2d(2, 5, 3)
    two = factorized_layer(conv, LayerFactors(left, right))
    torch.testing.assert_close(two[0].weight.double().reshape(3, -1).T, a)
    torch.testing.assert_close(two[1].weight.double().reshape(5, 3).T, b)
