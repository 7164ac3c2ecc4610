"""Cost-weighted SPR: each group's indicator priced by the MACs (params) its channel saves.

The prices are checked against torch-pruning's counter on physically pruned copies; the penalty
against :func:`spr_penalty` evaluated group by group with the priced ``lam``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from orprune.network.costs import count_macs_params
from orprune.spr import PerspectiveRegularizer, channel_group_costs
from orprune.spr.groups import _param_slices
from orprune.spr.penalty import spr_optimal_y, spr_penalty
from orprune.spr.pruning import _remove_groups
from tests.models import one_thread, small_model  # noqa: F401


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mobilenet_v2"])
@pytest.mark.parametrize("kind", ["macs", "params"])
def test_costs_equal_the_counted_saving_of_removing_one_channel(name, kind):
    model, x = small_model(name)
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.9, example_inputs=x[:1])
    costs = channel_group_costs(model, reg.groups_, x[:1], kind=kind)
    before = count_macs_params(model, x[:1])
    # the first and the last channel of every layer (dependency group)
    first, last = {}, {}
    for j, group in enumerate(reg.groups_):
        first.setdefault(group.dependency_group, j)
        last[group.dependency_group] = j
    checked = sorted(set(first.values()) | set(last.values()))
    assert len(checked) >= 4
    for j in checked:
        pruned = _remove_groups(copy.deepcopy(model), reg.groups_, (j,), x[:1])
        after = count_macs_params(pruned, x[:1])
        saving = before[0] - after[0] if kind == "macs" else before[1] - after[1]
        assert costs[j] == pytest.approx(saving, rel=1e-12), reg.groups_[j].root_module
    assert np.all(costs > 0)


def _per_group_reference(reg: PerspectiveRegularizer, model: torch.nn.Module, fn) -> torch.Tensor:
    """``fn`` (spr_penalty or spr_optimal_y) of each group alone, gathered from its members' slices,
    with ``lam * kappa_j``."""
    out = []
    for j, group in enumerate(reg.groups_):
        parts, bounds = [], []
        for member in group.members:
            if not member.penalized:
                continue
            module = model.get_submodule(member.module)
            for pname, dim in _param_slices(module, member.dim)[0]:
                part = getattr(module, pname).index_select(dim, torch.tensor(member.indices)).reshape(-1)
                parts.append(part)
                bounds.append(torch.full_like(part, reg.bounds_[member.module]).detach())
        lam = reg.lam * float(reg.cost_weights_[j])
        out.append(fn([torch.cat(parts)], reg.alpha, lam, [torch.cat(bounds)])[0])
    return torch.stack(out)


def test_priced_penalty_and_indicator_equal_the_group_by_group_closed_form():
    model, x = small_model("resnet20")
    model = model.double()
    for p in model.parameters():  # spread the groups over the three regimes
        p.data.mul_(torch.empty_like(p).uniform_(0.05, 1.5, generator=torch.Generator().manual_seed(p.numel())))
    reg = PerspectiveRegularizer(model, alpha=0.2, lam=0.3, m_scale=1.5, example_inputs=x[:1].double(),
                                 costs="macs")
    kappa = reg.cost_weights_
    assert kappa.mean() == pytest.approx(1.0) and np.ptp(kappa) > 1.0
    expected = _per_group_reference(reg, model, spr_penalty)
    torch.testing.assert_close(reg.penalties(), expected)
    torch.testing.assert_close(reg.optimal_y(), _per_group_reference(reg, model, spr_optimal_y))
    y = reg.optimal_y()
    assert (y == 1).any() and ((y > 0) & (y < 1)).sum() > 10  # several regimes are exercised
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(reg(), params, allow_unused=True),
                    torch.autograd.grad(expected.sum(), params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_gradcheck_with_priced_groups():
    model, x = small_model("resnet20")
    model = model.double()
    reg = PerspectiveRegularizer(model, alpha=0.1, lam=0.5, m_scale=2.0, example_inputs=x[:1].double(),
                                 costs="params")
    conv = model.layer1[0].conv1

    def penalty(weight):
        original = conv.weight
        try:
            del conv.weight
            conv.weight = weight
            return reg()
        finally:
            conv.weight = original

    weight = conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(penalty, (weight,), eps=1e-6, atol=1e-6)


def test_equal_costs_are_the_unpriced_penalty():
    model, x = small_model("vgg11_bn")
    plain = PerspectiveRegularizer(model, alpha=0.1, lam=0.9, example_inputs=x[:1])
    equal = PerspectiveRegularizer(model, alpha=0.1, lam=0.9, example_inputs=x[:1], costs=np.full(plain.n_groups, 7.0))
    torch.testing.assert_close(equal.penalties(), plain.penalties())
    assert plain.cost_weights_ is None and np.all(equal.cost_weights_ == 1.0)
    equal.lam = 0.0  # a schedule switching the indicator cost off: weight decay for every group
    torch.testing.assert_close(equal.penalties(), 0.1 * plain.group_norms() ** 2)


@pytest.mark.parametrize(
    "costs,match",
    [
        ("flops", r"`costs` must be one of \('macs', 'params'\)"),
        (np.ones(3), r"`costs` must have shape \(\d+,\), one per channel group"),
        ([["a"]], r"`costs` must be None, 'macs', 'params' or an array of numbers"),
        (float("nan"), r"`costs` must be finite and > 0"),  # one entry of an otherwise valid array
        (0.0, r"`costs` must be finite and > 0"),
        (-1.0, r"`costs` must be finite and > 0"),
    ],
)
def test_bad_costs_are_clear_errors(costs, match):
    model, x = small_model("vgg11_bn")
    if isinstance(costs, float):
        n = PerspectiveRegularizer(model, alpha=0.1, lam=0.9, example_inputs=x[:1]).n_groups
        costs = np.where(np.arange(n) == n // 2, costs, 1.0)
    with pytest.raises(ValueError, match=match):
        PerspectiveRegularizer(model, alpha=0.1, lam=0.9, example_inputs=x[:1], costs=costs)


def test_costs_leave_every_module_mode_and_statistic_as_it_was():
    model, x = small_model("resnet20")
    model.train()
    model.layer1.eval()  # mixed modes, e.g. a partly frozen network
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    PerspectiveRegularizer(model, alpha=0.1, lam=0.9, example_inputs=x[:1], costs="macs")
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
