"""The hand-written GCN layer against a dense reference computed entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orprune.c2f import CoarseToFineGating, GraphConv, GridGCN, grid_adjacency, normalize_adjacency


def test_grid_adjacency_counts_neighbours():
    a = grid_adjacency(3, 4).numpy()
    assert np.array_equal(a, a.T) and np.all(np.diag(a) == 0)
    assert a.sum() == 2 * (3 * 3 + 2 * 4)  # horizontal + vertical edges, both directions
    assert a[0, 1] == a[0, 4] == 1 and a[0, 5] == 0
    d = grid_adjacency(3, 4, diagonal=True).numpy()
    assert d[0, 5] == 1 and d.sum() == a.sum() + 2 * 2 * (2 * 3)


def test_graph_conv_equals_the_dense_reference():
    rng = np.random.default_rng(0)
    n, fin, fout = 7, 3, 4
    upper = np.triu(rng.random((n, n)) < 0.4, 1)
    adjacency = (upper | upper.T).astype(float) * rng.uniform(0.5, 2.0, (n, n))
    adjacency = np.triu(adjacency, 1) + np.triu(adjacency, 1).T  # weighted, symmetric
    layer = GraphConv(torch.tensor(adjacency, dtype=torch.float64), fin, fout).double()
    x = torch.tensor(rng.standard_normal((2, n, fin)))
    W = layer.linear.weight.detach().numpy()
    b = layer.linear.bias.detach().numpy()
    # reference: out[s, i, o] = sum_j (A+I)_ij / sqrt(d_i d_j) sum_f x[s, j, f] W[o, f] + b[o]
    a = adjacency + np.eye(n)
    degree = a.sum(1)
    expected = np.zeros((2, n, fout))
    for s in range(2):
        for i in range(n):
            for o in range(fout):
                total = b[o]
                for j in range(n):
                    total += a[i, j] / np.sqrt(degree[i] * degree[j]) * float(x[s, j].numpy() @ W[o])
                expected[s, i, o] = total
    assert np.allclose(layer(x).detach().numpy(), expected, atol=1e-12)


def test_normalized_adjacency_of_a_regular_graph():
    # a cycle of 5 nodes: every degree of A + I is 3, so A_hat = (A + I) / 3
    a = torch.zeros(5, 5)
    for i in range(5):
        a[i, (i + 1) % 5] = a[(i + 1) % 5, i] = 1
    assert torch.allclose(normalize_adjacency(a), (a + torch.eye(5)) / 3)


def test_grid_gcn_runs_and_gates():
    torch.manual_seed(0)
    model = GridGCN(4, 4, hidden=(5, 6), classes=3)
    images = torch.rand(2, 1, 4, 4)
    assert model(images).shape == (2, 3)
    gating = CoarseToFineGating(model, 0.5)
    assert gating.layer_names == ("convs.0.linear", "convs.1.linear", "classifier")
    masks = gating.harden()
    assert masks.kept == round(0.5 * (3 * 5 + 5 * 6 + 16 * 6 * 3))
    assert model(images).shape == (2, 3)


def test_bad_graph_inputs_raise():
    with pytest.raises(ValueError, match="`height`"):
        grid_adjacency(0, 3)
    with pytest.raises(ValueError, match="symmetric"):
        normalize_adjacency(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="square"):
        normalize_adjacency(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=">= 0"):
        normalize_adjacency(torch.tensor([[0.0, -1.0], [-1.0, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        GraphConv(grid_adjacency(2, 2), 3, 4)(torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="`hidden`"):
        GridGCN(hidden=())
