"""PartitionedLinear computes what the masked dense layer computes, with only the within-part weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from orprune import LayerProblem, PartitionedLinear, partition_layer, partition_module, partition_weights
from orprune.network.partition_surgery import masked_dense


@pytest.fixture(autouse=True)
def double():
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("d, q, P, bias", [(12, 8, 4, True), (10, 7, 3, False), (9, 5, 2, True)])
def test_partitioned_linear_equals_the_masked_dense_layer(d, q, P, bias):
    linear = nn.Linear(d, q, bias=bias)
    partition = partition_weights(linear.weight.detach().numpy().T, P, solver="heuristic")
    layer = PartitionedLinear.from_module(linear, partition)
    masked = masked_dense(linear, partition)
    x = torch.randn(5, 3, d)
    torch.testing.assert_close(layer(x), masked(x), rtol=1e-12, atol=1e-12)
    dense_mask = torch.as_tensor(partition.mask.T)
    torch.testing.assert_close(layer.to_dense(), torch.where(dense_mask, linear.weight, 0.0))
    n_weights = sum(p.numel() for p in layer.blocks)
    assert n_weights == int(partition.mask.sum()) < d * q
    assert sum(p.numel() for p in layer.parameters()) == n_weights + (q if bias else 0)
    layer(x).sum().backward()  # trainable like the dense layer
    assert all(p.grad is not None for p in layer.blocks)


def test_refit_weights_of_the_reconstruction_partition_are_written():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8))
    linear = nn.Linear(8, 6, bias=False)
    Y = X @ linear.weight.detach().numpy().T
    partition = partition_layer(LayerProblem.from_arrays(X, Y), 2)
    layer = PartitionedLinear.from_module(linear, partition)
    out = layer(torch.as_tensor(X)).detach().numpy()
    np.testing.assert_allclose(out, X @ partition.weights, atol=1e-10)
    assert np.sum((Y - out) ** 2) == pytest.approx(partition.objective, rel=1e-8)


def test_one_by_one_convolution():
    conv = nn.Conv2d(8, 6, kernel_size=1)
    partition = partition_weights(conv.weight.detach()[:, :, 0, 0].numpy().T, 3)
    layer = PartitionedLinear.from_module(conv, partition)
    x = torch.randn(2, 8, 5, 4)
    torch.testing.assert_close(layer(x), masked_dense(conv, partition)(x), rtol=1e-12, atol=1e-12)


def test_partition_module_replaces_layers_of_a_model_and_leaves_it_unchanged():
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Sequential(nn.Linear(12, 10), nn.Tanh()))
    partitions = {name: partition_weights(model.get_submodule(name).weight.detach().numpy().T, 2)
                  for name in ("0", "2.0")}
    pruned = partition_module(model, partitions)
    assert isinstance(pruned[0], PartitionedLinear) and isinstance(pruned[2][0], PartitionedLinear)
    assert isinstance(model[0], nn.Linear)
    masked = copy.deepcopy(model)
    for name, partition in partitions.items():
        parent, _, child = name.rpartition(".")
        setattr(masked.get_submodule(parent), child, masked_dense(model.get_submodule(name), partition))
    x = torch.randn(7, 16)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    linear = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="`input_parts`"):
        PartitionedLinear(4, 4, [0, 1, 0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="`module` must be a 1x1"):
        PartitionedLinear.from_module(nn.Conv2d(4, 4, 3), input_parts=[0, 1, 0, 1], output_parts=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="`module` must be an nn.Linear"):
        PartitionedLinear.from_module(nn.ReLU(), input_parts=[0], output_parts=[0])
    with pytest.raises(ValueError, match="pass a `partition`"):
        PartitionedLinear.from_module(linear)
    with pytest.raises(ValueError, match="`weights` must have shape"):
        PartitionedLinear.from_module(linear, input_parts=[0, 1, 0, 1], output_parts=[0, 1, 0, 1],
                                      weights=np.ones((3, 4)))
    with pytest.raises(ValueError, match="`partitions` names"):
        partition_module(nn.Sequential(linear), {"5": None})
