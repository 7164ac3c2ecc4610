"""Spatial (kh x 1 then 1 x kw) factorization: layout against a real conv, monotone alternation, certified bound,
exact surgery (factorized == reconstructed outputs), and never beaten by local searches from random starts."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch.nn import functional as F

import orprune
from orprune.layer.low_rank import map_objective, rank_curve
from orprune.layer.spatial_rank import select_spatial_rank, spatial_weights
from orprune.network.spatial_factorization import spatial_layer


def conv_problem(c=3, n=4, kernel=(3, 3), noise=0.3, true_rank=None, seed=0, ridge=0.0):
    """A conv layer's problem from unfolded patches of correlated random images; targets of a conv whose weights
    have spatial rank ``true_rank`` (None: full), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    mix = torch.randn(c, c, generator=gen, dtype=torch.float64)
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(6, c, 9, 9, generator=gen, dtype=torch.float64))
    x = x + F.avg_pool2d(x, 3, 1, 1)  # spatially correlated: G is not a Kronecker product
    if true_rank is None:
        w = torch.randn(n, c, kh, kw, generator=gen, dtype=torch.float64)
    else:
        v = torch.randn(true_rank, c, kh, generator=gen, dtype=torch.float64)
        z = torch.randn(n, true_rank, kw, generator=gen, dtype=torch.float64)
        w = torch.einsum("tci,ntj->ncij", v, z)
    y = F.conv2d(x, w, padding=1)
    y = y + noise * y.std() * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    cols = F.unfold(x, kernel, padding=1).transpose(1, 2).reshape(-1, c * kh * kw).numpy()  # rows (c, i, j)
    ys = y.permute(0, 2, 3, 1).reshape(-1, n).numpy()
    prob = orprune.LayerProblem(cols.T @ cols, cols.T @ ys, float((ys**2).sum()), ridge=ridge)
    return prob, cols, ys


def test_layout_and_objective_against_the_data():
    prob, cols, ys = conv_problem()
    sel = select_spatial_rank(prob, 2, channels=3, kernel=(3, 3))
    direct = float(((ys - cols @ sel.weights) ** 2).sum())
    assert sel.objective == pytest.approx(direct, rel=1e-9)
    assert sel.objective == pytest.approx(map_objective(prob, sel.weights), rel=1e-12)
    assert sel.status == "feasible" and sel.vertical.shape == (2, 3, 3) and sel.horizontal.shape == (4, 2, 3)


@pytest.mark.parametrize("ridge", [0.0, 5.0])
def test_alternation_never_increases_and_the_bound_holds(ridge):
    prob, _, _ = conv_problem(noise=0.5, ridge=ridge)
    curve = rank_curve(prob)
    for r in (1, 2, 3):
        sel = select_spatial_rank(prob, r, channels=3, kernel=(3, 3), sweeps=40)
        assert np.all(np.diff(sel.objectives) <= 1e-9 * sel.objectives[0])
        assert sel.objective == pytest.approx(sel.objectives[-1], rel=1e-9)
        assert curve.errors[min(3 * r, curve.max_rank)] <= sel.objective * (1 + 1e-9)
        assert sel.bound <= sel.objective and 0.0 <= sel.gap < 1.0
        assert curve.full_objective <= sel.objective


def test_recovers_an_exact_spatial_rank_map():
    prob, _, _ = conv_problem(true_rank=2, noise=0.0)
    sel = select_spatial_rank(prob, 2, channels=3, kernel=(3, 3))
    assert sel.objective <= 1e-9 * prob.yy


def test_never_beaten_by_local_searches_from_random_starts():
    prob, _, _ = conv_problem(c=2, n=3, noise=0.5, seed=3)
    r, c, kh, kw, n = 2, 2, 3, 3, 3
    sel = select_spatial_rank(prob, r, channels=c, kernel=(kh, kw), sweeps=200, tol=1e-13)

    def f(theta):
        v, z = theta[: r * c * kh].reshape(r, c, kh), theta[r * c * kh:].reshape(n, r, kw)
        return map_objective(prob, spatial_weights(v, z)) / prob.yy

    rng = np.random.default_rng(0)
    for _ in range(3):
        found = minimize(f, rng.standard_normal(r * c * kh + n * r * kw), method="L-BFGS-B",
                         options={"maxiter": 5000, "ftol": 1e-14, "gtol": 1e-10})
        assert sel.objective / prob.yy <= found.fun + 1e-6


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), ((2, 1), (1, 2), (1, 2)), ((1, 2), (0, 1), (2, 1))])
def test_surgery_equals_the_reconstructed_conv(stride, padding, dilation):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, (3, 5), stride=stride, padding=padding, dilation=dilation, bias=True).double()
    rng = np.random.default_rng(1)
    v, z, bias = rng.standard_normal((2, 3, 3)), rng.standard_normal((5, 2, 5)), rng.standard_normal(5)
    two = spatial_layer(conv, v, z, bias)
    assert two[0].kernel_size == (3, 1) and two[1].kernel_size == (1, 5)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(spatial_weights(v, z).T.reshape(5, 3, 3, 5)))
        conv.bias.copy_(torch.from_numpy(bias))
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(two(x), conv(x), rtol=1e-10, atol=1e-10)
    macs, _ = orprune.count_macs_params(two, x[:1])
    h_out, w_out = conv(x[:1]).shape[2:]
    mid = two[0](x[:1])
    assert macs == mid.shape[2] * mid.shape[3] * 2 * 3 * 3 + h_out * w_out * 5 * 2 * 5 + h_out * w_out * 5


def test_bad_inputs():
    prob, _, _ = conv_problem()
    with pytest.raises(ValueError, match="`channels` x kh x kw"):
        select_spatial_rank(prob, 1, channels=2, kernel=(3, 3))
    with pytest.raises(ValueError, match="`rank` must lie"):
        select_spatial_rank(prob, 10, channels=3, kernel=(3, 3))
    with pytest.raises(ValueError, match="`kernel` must be"):
        select_spatial_rank(prob, 1, channels=3, kernel=3)
    with pytest.raises(ValueError, match="zero padding"):
        spatial_layer(torch.nn.Conv2d(3, 4, 3, padding="same"), np.zeros((1, 3, 3)), np.zeros((4, 1, 3)))
    with pytest.raises(ValueError, match="`vertical` must have shape"):
        spatial_layer(torch.nn.Conv2d(3, 4, 3), np.zeros((1, 2, 3)), np.zeros((4, 1, 3)))
