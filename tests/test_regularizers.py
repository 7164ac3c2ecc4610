"""Tests of the Structured Perspective Regularization (orprune.regularizers).

References are independent of the closed form: the minimum over y of lam*y + alpha*||w||^2/y on
[r(w), 1] computed by scipy's bounded scalar minimiser and by cvxpy (quad_over_lin), finite-difference
gradients, and channel groups written out by hand for small architectures.
"""

from __future__ import annotations

import math
from collections import Counter

import cvxpy as cp
import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from orprune.regularizers.perspective import PerspectiveRegularizer
from orprune.regularizers.spr import spr_optimal_y, spr_penalty

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


# ------------------------------------------------------------------------------------------------
# channel groups of small networks, written out by hand


class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.blk1, self.blk2 = Block(4, 4, 1), Block(4, 6, 2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.blk2(self.blk1(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class SelfCoupled(nn.Module):
    """x + b(x): b's input and output channels are the same channel, so b.weight[c, c] is touched twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        return self.fc((x + self.b(x)).mean((2, 3)))


class FlattenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.dw, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
        self.pw, self.bn2 = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn1(self.dw(torch.relu(self.bn0(self.conv(x)))))
        return self.fc(torch.relu(self.bn2(self.pw(x))).mean((2, 3)))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Weights away from 0 (so every entry has a nonzero gradient), in double precision."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            sign = torch.randint(0, 2, p.shape, generator=gen).double() * 2 - 1
            p.copy_(sign * (0.2 + torch.rand(p.shape, generator=gen, dtype=torch.float64)))
    return model


X = torch.randn(2, 3, 8, 8, dtype=torch.float64)

# Each group: list of (parameter name, index into that parameter). Index ":" is slice(None).
S = slice(None)


def expected_groups(name):
    if name == "convbn":
        return ([[("conv1.weight", c), ("conv1.bias", c), ("bn1.weight", c), ("bn1.bias", c)] for c in range(4)]
                + [[("conv2.weight", c), ("bn2.weight", c), ("bn2.bias", c)] for c in range(5)])
    if name == "resnet":
        bn = lambda p, c: [(f"{p}.weight", c), (f"{p}.bias", c)]  # noqa: E731
        return ([[("stem.weight", c), *bn("bn", c), ("blk1.c2.weight", c), *bn("blk1.b2", c)] for c in range(4)]
                + [[("blk1.c1.weight", c), *bn("blk1.b1", c)] for c in range(4)]
                + [[("blk2.c1.weight", c), *bn("blk2.b1", c)] for c in range(6)]
                + [[("blk2.c2.weight", c), *bn("blk2.b2", c), ("blk2.short.0.weight", c), *bn("blk2.short.1", c)]
                   for c in range(6)])
    if name == "selfcoupled":  # with include_consumers: b's row c and column c overlap in b.weight[c, c]
        return [[("a.weight", c), ("a.bias", c), ("b.weight", c), ("b.weight", (S, c)), ("b.bias", c),
                 ("fc.weight", (S, c))] for c in range(4)]
    if name == "flatten":  # with include_consumers: channel c is fc1's inputs 4c..4c+3 after the flatten
        return ([[("conv.weight", c), ("conv.bias", c), ("bn.weight", c), ("bn.bias", c),
                  ("fc1.weight", (S, slice(4 * c, 4 * c + 4)))] for c in range(4)]
                + [[("fc1.weight", j), ("fc1.bias", j), ("fc2.weight", (S, j))] for j in range(8)])
    if name == "depthwise":
        return ([[("conv.weight", c), ("conv.bias", c), ("bn0.weight", c), ("bn0.bias", c), ("dw.weight", c),
                  ("dw.bias", c), ("bn1.weight", c), ("bn1.bias", c)] for c in range(4)]
                + [[("pw.weight", c), ("pw.bias", c), ("bn2.weight", c), ("bn2.bias", c)] for c in range(6)])
    raise KeyError(name)


CASES = {
    "convbn": (ConvBNNet, False),
    "resnet": (ResNet, False),
    "selfcoupled": (SelfCoupled, True),
    "flatten": (FlattenMLP, True),
    "depthwise": (Depthwise, False),
}


def entry_set(model, spec) -> frozenset:
    """The (parameter, flat index) pairs of a hand-written group, each once."""
    params = dict(model.named_parameters())
    out = set()
    for pname, index in spec:
        flat = torch.arange(params[pname].numel()).reshape(params[pname].shape)
        out.update((pname, int(i)) for i in flat[index].reshape(-1))
    return frozenset(out)


def manual_vectors(model, m_scale, spec_groups):
    """Hand-gathered weight vectors and per-entry bounds: a layer's bound is m_scale times the largest
    absolute value of its parameter tensors that are penalised in some group."""
    params = dict(model.named_parameters())
    penalised = {p for spec in spec_groups for p, _ in spec}
    layer_max: dict[str, float] = {}
    for p in penalised:
        layer = p.rsplit(".", 1)[0]
        layer_max[layer] = max(layer_max.get(layer, 0.0), m_scale * float(params[p].detach().abs().max()))
    vecs, bounds = [], []
    for spec in spec_groups:
        entries = sorted(entry_set(model, spec))
        vecs.append(torch.stack([params[p].reshape(-1)[i] for p, i in entries]))
        bounds.append(torch.tensor([layer_max[p.rsplit(".", 1)[0]] for p, _ in entries], dtype=torch.float64))
    return vecs, bounds


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
