"""Trained Rank Pruning: nuclear norm and its subgradient, energy truncation every period, exact decomposition."""

import numpy as np
import pytest
import torch
from torch import nn

from orprune.network.graph import weight_matrix
from orprune.trp import TrainedRankRegularizer, energy_rank, train_with_trp
from tests.models import calibrate_batchnorm, one_thread  # noqa: F401  (one_thread: module fixture)


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    return calibrate_batchnorm(model, torch.randn(8, 1, 8, 8))


def test_energy_rank():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(s, e) for e in (0.5, 9 / 14, 0.9, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert energy_rank(np.zeros(3), 0.9) == 1


def test_nuclear_norm_and_its_subgradient():
    model = net()
    reg = TrainedRankRegularizer(model, ignored_layers=["8"])
    assert reg.layers_ == ("0", "3")
    value = reg()
    expected = sum(np.linalg.svd(weight_matrix(model.get_submodule(n)).numpy(), compute_uv=False).sum()
                   for n in reg.layers_)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    w = weight_matrix(model[3]).double().numpy()
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    grad = model[3].weight.grad.reshape(12, -1).T.numpy()  # the layout of weight_matrix
    np.testing.assert_allclose(grad, u @ vt, atol=1e-5)  # d||W||_* / dW = U V^T (full column rank)


def test_truncation_every_period_keeps_the_energy():
    model = net()
    reg = TrainedRankRegularizer(model, energy=0.8, period=3)
    before = {n: s.clone() for n, s in reg.singular_values().items()}
    for _ in range(7):
        reg.after_step()
    assert reg.steps_ == 7 and reg.truncations_ == 2
    for name, s in reg.singular_values().items():
        r = reg.ranks_[name]
        assert int((s > 1e-6 * s[0]).sum()) == r  # the weights now have that rank
        first = energy_rank(before[name], 0.8)
        assert r <= first and float((before[name][:first] ** 2).sum()) >= 0.8 * float((before[name] ** 2).sum())


def test_every_step_hook_and_decomposition_is_exact():
    model = net()
    images, labels = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    result = train_with_trp(model, images, labels, epochs=2, batch_size=16, nuclear=1e-3, energy=0.9, period=2,
                            ignored_layers=["8"], progress=False, flip=False)
    reg = result.regularizer
    assert reg.steps_ == 8 and reg.truncations_ == 4 + 1  # every 2 of 8 steps, and once at the end
    assert result.macs_after < result.macs_before
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():  # decomposing low-rank weights by their SVD is exact
        torch.testing.assert_close(result.model(x), result.trained(x), rtol=1e-4, atol=1e-5)
    for name, r in result.ranks.items():
        layer = result.model.get_submodule(name)
        if isinstance(layer, nn.Sequential):
            assert layer[0].out_channels == reg.ranks_[name]
    # with calibration data: the optimal maps of those ranks; the trained weights are rank r already,
    # so the data-driven decomposition reproduces them up to the ridge
    data_driven = reg.decompose(calibration=[torch.rand(32, 1, 8, 8)], ridge=0.0, positions_per_image=None)
    with torch.no_grad():
        torch.testing.assert_close(data_driven(x), result.trained(x), rtol=1e-3, atol=1e-3)


def test_bad_inputs():
    model = net()
    with pytest.raises(ValueError, match="`energy` must lie in"):
        TrainedRankRegularizer(model, energy=0.0)
    with pytest.raises(ValueError, match="`period` must be a positive integer"):
        TrainedRankRegularizer(model, period=0)
    with pytest.raises(ValueError, match="`layers` names"):
        TrainedRankRegularizer(model, layers=["1"])
    with pytest.raises(ValueError, match="`ranks` must give"):
        TrainedRankRegularizer(model).decompose(ranks={"0": 1})
