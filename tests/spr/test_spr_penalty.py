"""Tests of the SPR closed form (orprune.spr_penalty, spr_optimal_y).

References are independent of the closed form: the minimum over y of lam*y + alpha*||w||^2/y on
[r(w), 1] computed by scipy's bounded scalar minimiser and by cvxpy (quad_over_lin), and
finite-difference gradients.
"""

from __future__ import annotations

import math
from collections import Counter

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from orprune.spr.penalty import spr_optimal_y, spr_penalty

REL = 1e-6

# ------------------------------------------------------------------------------------------------
# numerical references


def scipy_min(w: np.ndarray, m: np.ndarray, alpha: float, lam: float) -> tuple[float, float]:
    """min over y in [r, 1] of lam*y + alpha*||w||^2/y; Brent never evaluates the endpoints, so add them."""
    sq, r = float(w @ w), float(np.max(np.abs(w) / m))
    f = lambda y: lam * y + alpha * sq / y  # noqa: E731
    if r >= 1.0:
        return f(1.0), 1.0
    res = minimize_scalar(f, bounds=(r, 1.0), method="bounded", options={"xatol": 1e-13})
    return min((f(res.x), res.x), (f(r), r), (f(1.0), 1.0))


def cvxpy_min(w: np.ndarray, m: np.ndarray, alpha: float, lam: float) -> tuple[float, float]:
    """The perspective relaxation with w fixed: min lam*y + alpha*quad_over_lin(w, y), |w| <= M*y, y <= 1."""
    y = cp.Variable()
    prob = cp.Problem(cp.Minimize(lam * y + alpha * cp.quad_over_lin(w, y)), [np.abs(w) <= m * y, y <= 1])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-8, tol_gap_rel=1e-8, tol_feas=1e-8)
    assert prob.status == cp.OPTIMAL
    return float(prob.value), float(y.value)


def make_group(rng: np.random.Generator, t: float, r: float, alpha: float, lam: float, d: int,
               per_entry: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random w and bounds M with sqrt(alpha/lam)*||w|| = t and max|w_i|/M_i = r."""
    u = rng.standard_normal(d)
    w = u * (t / (math.sqrt(alpha / lam) * np.linalg.norm(u)))
    base = rng.uniform(0.5, 2.0, d) if per_entry else np.ones(d)
    return w, base * (np.max(np.abs(w) / base) / r)


ALPHA, LAM = 0.3, 0.7
# (t, r) on each boundary of the three regimes, and just either side of it.
BOUNDARIES = [(1.0, 0.4), (0.5, 0.5), (0.3, 1.0), (1.0, 1.0), (0.8, 0.8)]


def boundary_cases():
    for t, r in BOUNDARIES:
        for dt, dr in [(0, 0), (1e-7, 0), (-1e-7, 0), (0, 1e-7), (0, -1e-7)]:
            yield t + dt, min(r + dr, 1.0)


@pytest.mark.parametrize("per_entry", [False, True])
def test_spr_matches_numerical_minimum_in_every_regime(per_entry):
    rng = np.random.default_rng(0 if per_entry else 1)
    cases = [(rng.uniform(0.02, 1.6), rng.uniform(0.02, 1.0)) for _ in range(24)] + list(boundary_cases())
    ws, ms = zip(*(make_group(rng, t, r, ALPHA, LAM, int(rng.integers(1, 12)), per_entry) for t, r in cases))
    # one padded batch, so groups of different lengths go through the same call
    d = max(len(w) for w in ws)
    W = torch.zeros(len(ws), d, dtype=torch.float64)
    Mt = torch.ones(len(ws), d, dtype=torch.float64)
    for i, (w, m) in enumerate(zip(ws, ms)):
        W[i, : len(w)] = torch.from_numpy(w)
        Mt[i, : len(w)] = torch.from_numpy(m)
    got = spr_penalty(W, ALPHA, LAM, Mt if per_entry else Mt[:, 0]).numpy()  # column 0 is never padding
    y_got = spr_optimal_y(W, ALPHA, LAM, Mt).numpy()

    regimes = Counter()
    for i, (w, m) in enumerate(zip(ws, ms)):
        ref_s, y_s = scipy_min(w, m, ALPHA, LAM)
        ref_c, y_c = cvxpy_min(w, m, ALPHA, LAM)
        assert got[i] == pytest.approx(ref_s, rel=REL)
        assert got[i] == pytest.approx(ref_c, rel=REL)
        # the objective is flat at an interior optimum: the minimiser is known to ~sqrt(tolerance) only
        assert y_got[i] == pytest.approx(y_s, abs=1e-6)
        assert y_got[i] == pytest.approx(y_c, abs=1e-3)
        r = float(np.max(np.abs(w) / m))
        if i < 24:  # classify by where the numerical minimiser sits, not by the closed form's test
            regimes[1 if y_s > 1 - 1e-6 else 3 if abs(y_s - r) < 1e-6 else 2] += 1
    assert all(regimes[k] >= 3 for k in (1, 2, 3)), regimes


def test_spr_is_continuous_across_regime_boundaries():
    rng = np.random.default_rng(2)
    for t, r in BOUNDARIES:
        w, m = make_group(rng, t, r, ALPHA, LAM, 6, per_entry=True)
        W = torch.tensor(w).reshape(1, -1)
        vals = [spr_penalty(W * s, ALPHA, LAM, torch.tensor(m).reshape(1, -1)).item()
                for s in (1 - 1e-9, 1.0, 1 + 1e-9)]
        assert max(vals) - min(vals) < 1e-7 * max(vals)


def test_list_input_and_per_group_bound_match_dense():
    gen = torch.Generator().manual_seed(3)
    groups = [torch.randn(k, generator=gen, dtype=torch.float64) for k in (1, 4, 9, 2)]
    m = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    from_list = spr_penalty(groups, 0.2, 0.5, m)
    one_by_one = torch.cat([spr_penalty(g.reshape(1, -1), 0.2, 0.5, float(mi)) for g, mi in zip(groups, m)])
    torch.testing.assert_close(from_list, one_by_one)
    per_entry = [torch.full_like(g, float(mi)) for g, mi in zip(groups, m)]
    torch.testing.assert_close(spr_penalty(groups, 0.2, 0.5, per_entry), one_by_one)
    assert spr_penalty([], 0.2, 0.5, 1.0).shape == (0,)


def test_gradcheck_inside_each_regime():
    rng = np.random.default_rng(4)
    # strictly inside regimes 1 (via t and via r), 2 and 3, far from boundaries and from w = 0
    cases = [(1.5, 0.3), (0.4, 0.9), (0.6, 0.2), (0.3, 0.7), (0.1, 0.5)]
    for per_entry in (True, False):
        rows = [make_group(rng, t, r, ALPHA, LAM, 5, per_entry) for t, r in cases]
        # regime 1 "via r" needs r > 1, outside the box: halve the bound of the (t, r) = (0.4, 0.9) group
        rows.append((rows[1][0], rows[1][1] * 0.5))
        W = torch.tensor(np.stack([w for w, _ in rows]), requires_grad=True)
        M = torch.tensor(np.stack([m for _, m in rows]))
        M = M if per_entry else M[:, 0]
        assert torch.autograd.gradcheck(lambda x: spr_penalty(x, ALPHA, LAM, M), (W,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("alpha,lam", [(0.3, 0.7), (0.0, 0.7), (0.3, 0.0), (0.0, 0.0)])
def test_zero_group_has_zero_value_and_zero_gradient(alpha, lam):
    W = torch.zeros(3, 4, dtype=torch.float64)
    W[1] = torch.tensor([0.1, -0.2, 0.3, 0.05], dtype=torch.float64)
    W.requires_grad_(True)
    out = spr_penalty(W, alpha, lam, 1.0)
    out.sum().backward()
    assert out[0].item() == 0.0 and out[2].item() == 0.0
    assert torch.isfinite(W.grad).all()
    assert torch.all(W.grad[0] == 0) and torch.all(W.grad[2] == 0)


def test_parameter_limits_match_the_minimum_over_y():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(20, 6, generator=gen, dtype=torch.float64) * torch.rand(20, 1, generator=gen, dtype=torch.float64)
    M, sq = 3.0, (W * W).sum(dim=1)
    r = W.abs().amax(dim=1) / M
    # lam = 0: y* = 1, weight decay; alpha = 0: y* = min(1, r)
    torch.testing.assert_close(spr_penalty(W, 0.4, 0.0, M), 0.4 * sq)
    torch.testing.assert_close(spr_penalty(W, 0.0, 0.6, M), 0.6 * torch.clamp(r, max=1.0))
    assert torch.all(spr_penalty(W, 0.0, 0.0, M) == 0)
    # they are the limits of the closed form
    torch.testing.assert_close(spr_penalty(W, 0.4, 1e-12, M), 0.4 * sq, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(spr_penalty(W, 1e-14, 0.6, M), 0.6 * torch.clamp(r, max=1.0), atol=1e-6, rtol=1e-6)
    # M = inf: the reverse Huber function
    s = torch.sqrt(sq)
    berhu = torch.where(s <= math.sqrt(0.6 / 0.4), 2 * math.sqrt(0.24) * s, 0.4 * sq + 0.6)
    torch.testing.assert_close(spr_penalty(W, 0.4, 0.6, math.inf), berhu)


def test_spr_is_convex_on_the_box():
    # convex where the relaxation is feasible (|w_i| <= M_i); beyond the box the saturated extension is not
    gen = torch.Generator().manual_seed(6)
    a = (torch.randn(500, 5, generator=gen, dtype=torch.float64) * 0.6).clamp(-1, 1)
    b = (torch.randn(500, 5, generator=gen, dtype=torch.float64) * 0.6).clamp(-1, 1)
    m = torch.rand(1, 5, generator=gen, dtype=torch.float64).add(1.0).expand(500, 5)
    f = lambda x: spr_penalty(x, ALPHA, LAM, m)  # noqa: E731
    for theta in (0.25, 0.5, 0.8):
        assert torch.all(f(theta * a + (1 - theta) * b) <= theta * f(a) + (1 - theta) * f(b) + 1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weights": torch.tensor([[1.0, float("nan")]])}, r"`weights` must be finite.*\[0\]"),
        ({"weights": torch.tensor([[1.0], [float("inf")]])}, r"`weights` must be finite.*\[1\]"),
        ({"weights": torch.ones(3)}, r"`weights` must be a 2-D tensor"),
        ({"weights": torch.ones(2, 2, dtype=torch.long)}, r"`weights` must be floating point"),
        ({"weights": [torch.ones(2, 2)]}, r"`weights` given as a sequence"),
        ({"weights": "abc"}, r"`weights` must be a 2-D torch tensor"),
        ({"alpha": -0.1}, r"`alpha` must be finite and >= 0"),
        ({"alpha": float("nan")}, r"`alpha` must be finite and >= 0"),
        ({"alpha": True}, r"`alpha` must be a real number"),
        ({"lam": -1.0}, r"`lam` must be finite and >= 0"),
        ({"lam": float("inf")}, r"`lam` must be finite and >= 0"),
        ({"M": 0.0}, r"`M` must be > 0"),
        ({"M": -2.0}, r"`M` must be > 0"),
        ({"M": float("nan")}, r"`M` must be > 0"),
        ({"M": torch.tensor([1.0, 0.0])}, r"`M` must be > 0"),
        ({"M": torch.ones(3)}, r"`M` must be a scalar, have shape \(2,\)"),
        ({"M": "big"}, r"`M` must be a positive number"),
    ],
)
def test_spr_penalty_rejects_bad_inputs(kwargs, match):
    args = {"weights": torch.ones(2, 3), "alpha": 0.5, "lam": 0.5, "M": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        spr_penalty(**args)
