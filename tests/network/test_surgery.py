"""Surgery: the physically pruned model equals the masked model, costs match, round trips work."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from orprune.layer.problem import LayerProblem
from orprune.layer.selection import select
from orprune.network.calibration import collect_statistics
from orprune.network.costs import network_costs
from orprune.network.graph import find_groups
from orprune.network.surgery import ConsumerUpdate, PruningPlan, apply_pruning, masked_copy, write_updates
from tests.models import SMALL, one_thread, small_model  # noqa: F401


def quiet_groups(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_groups(model, x, max_features=1000, **kwargs)


def least_squares_plan(model, graph, stats, keep_counts, ridge=1e-3, units=None):
    """Greedy selection + least-squares refit with an intercept for every (chosen) unit."""
    keep, updates = {}, {}
    for unit in graph.units:
        if units is not None and unit.name not in units:
            continue
        problems = [stats[c.name].to_problem(group_size=c.group_size, ridge=ridge, center=True)
                    for c in unit.consumers]
        prob = problems[0] if len(problems) == 1 else LayerProblem.combine(problems)
        sel = select(prob, keep_counts[unit.name], solver="greedy")
        keep[unit.name] = sel.kept
        for c, p in zip(unit.consumers, problems):
            weights = p.refit(sel.mask)[0]
            mean_x, mean_y = stats[c.name].means()
            bias = model.get_submodule(c.name).bias
            old = 0.0 if bias is None else bias.detach().double().numpy()
            updates[c.name] = ConsumerUpdate(weights, old + mean_y - mean_x @ weights)
    return PruningPlan(keep, updates)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", list(SMALL))
def test_pruned_model_equals_masked_model(name):
    model, x = small_model(name, batch=8)
    state = copy.deepcopy(model.state_dict())
    graph = quiet_groups(model, x)
    stats = collect_statistics(model, graph.consumers, [x[:4], x[4:]], positions_per_image=16,
                               progress=False)
    rng = np.random.default_rng(0)
    counts = {u.name: int(rng.integers(1, u.n_channels + 1)) for u in graph.units}
    plan = least_squares_plan(model, graph, stats, counts)
    masked = masked_copy(model, graph, plan)
    pruned = apply_pruning(model, graph, plan, x[:2])
    expected = outputs(masked, x)
    atol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(outputs(pruned, x), expected, rtol=1e-4, atol=atol)
    assert n_params(pruned) < n_params(model) == n_params(masked)
    # the user's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # the cost model predicts what torch-pruning counts on the result
    costs = network_costs(model, graph, x[:2])
    ops, params = tp.utils.count_ops_and_params(pruned, x[:2])
    assert costs.evaluate({u: len(k) for u, k in plan.keep.items()}) == pytest.approx(
        {"macs": ops, "params": params}, rel=1e-12)
    assert n_params(pruned) == params


def test_keeping_everything_reconstructs_the_original():
    model, x = small_model("resnet20", batch=8)
    graph = quiet_groups(model, x)
    stats = collect_statistics(model, graph.consumers, [x], positions_per_image=None, progress=False)
    plan = least_squares_plan(model, graph, stats, graph.n_channels, ridge=0.0)
    expected = outputs(model, x)
    for rebuilt in (masked_copy(model, graph, plan), apply_pruning(model, graph, plan, x[:2])):
        atol = 1e-4 * float(expected.abs().max())
        torch.testing.assert_close(outputs(rebuilt, x), expected, rtol=1e-3, atol=atol)


def test_layer_error_is_the_problem_objective():
    """One unit pruned: the consumer's output error on the calibration data is what the
    least-squares problem reports (consumer with a bias, so the intercept is visible)."""
    model, x = small_model("vgg11_bn", batch=4)
    graph = quiet_groups(model, x)
    unit = graph["features.0"]
    (consumer,) = unit.consumers
    stats = collect_statistics(model, [consumer], [x], positions_per_image=None, progress=False)
    prob = stats[consumer.name].to_problem(group_size=consumer.group_size, center=True)
    sel = select(prob, unit.n_channels // 2, solver="greedy")
    half = {unit.name: unit.n_channels // 2}
    plan = least_squares_plan(model, graph, stats, half, ridge=0.0, units=[unit.name])
    np.testing.assert_array_equal(plan.keep[unit.name], sel.kept)
    seen = {}
    for m, key in ((model, "original"), (apply_pruning(model, graph, plan, x[:2]), "pruned")):
        handle = m.get_submodule(consumer.name).register_forward_hook(
            lambda mod, a, out, key=key: seen.__setitem__(key, out.detach().double()))
        outputs(m, x)
        handle.remove()
    error = float(((seen["pruned"] - seen["original"]) ** 2).sum())
    assert error == pytest.approx(sel.objective, rel=1e-4)
    assert error < 0.99 * prob.yy  # and the refit does better than dropping the layer's signal


def test_save_load_and_state_dict_round_trips():
    model, x = small_model("mobilenet_v2", batch=4)
    graph = quiet_groups(model, x)
    stats = collect_statistics(model, graph.consumers, [x], positions_per_image=8, progress=False)
    counts = {u.name: max(1, u.n_channels // 3) for u in graph.units}
    plan = least_squares_plan(model, graph, stats, counts)
    pruned = apply_pruning(model, graph, plan, x[:2])
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model)
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned, x), rtol=0, atol=0)
    plan = pickle.loads(pickle.dumps(plan))  # a plan travels (to a worker, to disk)
    skeleton = apply_pruning(small_model("mobilenet_v2")[0], graph, plan.skeleton(), x[:2])
    skeleton.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(outputs(skeleton, x), outputs(pruned, x), rtol=0, atol=0)


class TwoBranches(nn.Module):
    """One unit read by two consumers (a 3x3 and a 1x1 conv) whose outputs are concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.left = nn.Conv2d(10, 6, 3, padding=1)
        self.right = nn.Conv2d(10, 4, 1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.cat([self.left(h), self.right(h)], 1)
        return self.fc(h.mean((2, 3)))


def test_a_unit_with_two_consumers_is_one_decision():
    torch.manual_seed(0)
    model, x = TwoBranches().eval(), torch.randn(6, 3, 8, 8)
    graph = quiet_groups(model, x)
    assert graph.names == ("stem", "left", "right")  # the concatenated branches are units too (issue 21)
    assert [(c.name, c.group_size) for c in graph["stem"].consumers] == [("left", 9), ("right", 1)]
    stats = collect_statistics(model, graph.consumers, [x], positions_per_image=None, progress=False)
    plan = least_squares_plan(model, graph, stats, {"stem": 4}, ridge=0.0, units={"stem"})
    pruned = apply_pruning(model, graph, plan, x)
    assert (pruned.left.in_channels, pruned.right.in_channels, pruned.bn.num_features) == (4, 4, 4)
    masked = masked_copy(model, graph, plan)
    torch.testing.assert_close(outputs(pruned, x), outputs(masked, x), rtol=1e-4, atol=1e-6)
    # the shared choice is optimal for the summed error: each consumer's refit error adds up
    problems = [stats[c].to_problem(group_size=g, center=True) for c, g in (("left", 9), ("right", 1))]
    mask = np.isin(np.arange(10), plan.keep["stem"])
    combined = LayerProblem.combine(problems)
    assert combined.objective(mask) == pytest.approx(sum(p.objective(mask) for p in problems), rel=1e-9)
    costs = network_costs(model, graph, x)
    ops, params = tp.utils.count_ops_and_params(pruned, x)
    assert costs.evaluate({"stem": 4}) == pytest.approx({"macs": ops, "params": params}, rel=1e-12)


class NoNorm(nn.Module):
    """Bias-free convs without BatchNorm: a reconstructed bias needs a new parameter."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 6, 3, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_bias_is_added_where_no_norm_can_absorb_it():
    torch.manual_seed(0)
    model, x = NoNorm().eval(), torch.randn(4, 3, 8, 8)
    graph = quiet_groups(model, x)
    assert graph.names == ("conv1", "conv2") and graph["conv1"].consumers[0].norm is None
    stats = collect_statistics(model, graph.consumers, [x], positions_per_image=None, progress=False)
    plan = least_squares_plan(model, graph, stats, {"conv1": 3, "conv2": 4})
    pruned = apply_pruning(model, graph, plan, x)
    assert pruned.conv2.bias is not None and model.conv2.bias is None
    assert pruned.conv2.weight.shape == (4, 3, 3, 3)
    masked = masked_copy(model, graph, plan)
    torch.testing.assert_close(outputs(pruned, x), outputs(masked, x), rtol=1e-4, atol=1e-6)
    skeleton = apply_pruning(NoNorm(), graph, plan.skeleton(), x)
    skeleton.load_state_dict(pruned.state_dict())


def test_ignored_layers_are_left_alone():
    model, x = small_model("vgg11_bn", batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = find_groups(model, x, ignored_layers=["features.8"], max_features=1000)
    plan = PruningPlan({u.name: [0] for u in graph.units})
    pruned = apply_pruning(model, graph, plan, x)
    for name in ("features.8", "features.9"):
        for key, value in model.get_submodule(name).state_dict().items():
            assert torch.equal(pruned.get_submodule(name).state_dict()[key], value)
    assert pruned.features[0].out_channels == 1


def test_plan_validation():
    model, x = small_model("resnet20")
    graph = quiet_groups(model, x)
    c = graph.consumers[0]
    good = np.zeros((c.n_features, c.n_outputs))
    mask = np.zeros(c.n_channels, dtype=bool)
    mask[[0, 2]] = True
    np.testing.assert_array_equal(PruningPlan({c.unit: mask}).keep[c.unit], [0, 2])
    with pytest.raises(ValueError, match="not a prunable unit"):
        apply_pruning(model, graph, PruningPlan({"fc": [0]}), x)
    with pytest.raises(ValueError, match=r"indices in \[0, 8\)"):
        masked_copy(model, graph, PruningPlan({c.unit: [0, 8]}))
    with pytest.raises(ValueError, match="non-empty"):
        PruningPlan({c.unit: []})
    with pytest.raises(ValueError, match="not a consumer"):
        masked_copy(model, graph, PruningPlan({}, {"bn1": ConsumerUpdate(bias=np.zeros(10))}))
    with pytest.raises(ValueError, match=r"shape \(C\*g, n_out\)"):
        masked_copy(model, graph, PruningPlan({}, {c.name: ConsumerUpdate(good[1:])}))
    with pytest.raises(ValueError, match="`plan.updates"):
        masked_copy(model, graph, PruningPlan({}, {c.name: ConsumerUpdate(good, np.zeros(3))}))
    with pytest.raises(ValueError, match="finite"):
        ConsumerUpdate(good * np.nan)
    with pytest.raises(ValueError, match="ConsumerUpdate"):
        PruningPlan({}, {c.name: good})
    with pytest.raises(ValueError, match="`graph`"):
        masked_copy(model, None, PruningPlan({}))
    with pytest.raises(ValueError, match="`plan`"):
        masked_copy(model, graph, {c.unit: [0]})


@pytest.mark.parametrize("name", list(SMALL))
def test_updates_written_one_by_one_equal_the_masked_copy(name):
    """The sequential refit's working copy: updates written in place, consumer by consumer."""
    model, x = small_model(name, batch=8)
    graph = quiet_groups(model, x)
    stats = collect_statistics(model, graph.consumers, [x], positions_per_image=16, progress=False)
    rng = np.random.default_rng(1)
    plan = least_squares_plan(model, graph, stats, {u.name: int(rng.integers(1, u.n_channels + 1)) for u in graph.units})
    working = masked_copy(model, graph, PruningPlan(plan.keep, {}))
    for name_ in plan.updates:
        write_updates(working, graph, plan, [name_])
    expected = masked_copy(model, graph, plan).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in working.state_dict().items())


def test_unchecked_problem_refits_like_the_checked_one():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(40, 12)), rng.normal(size=(40, 3))
    gram, cross, yy = X.T @ X, X.T @ Y, float((Y * Y).sum())
    checked = LayerProblem(gram, cross, yy, group_size=3, ridge=0.1)
    fast = LayerProblem(gram.copy(), cross, yy, group_size=3, ridge=0.1, check=False)
    mask = np.array([True, False, True, True])
    np.testing.assert_array_equal(fast.refit(mask)[0], checked.refit(mask)[0])
