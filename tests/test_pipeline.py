"""Whole-network pruning: budgets, equivalence with the masked model, executors, errors."""

import itertools
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn as nn

import orprune
from orprune.network.costs import count_macs_params
from orprune.network.surgery import masked_copy
from tests.models import TinyNet, calibrate_batchnorm, one_thread, resnet18, small_model  # noqa: F401  (one_thread: module fixture)

ARCHITECTURES = ["resnet20", "resnet18", "vgg11_bn", "mobilenet_v2"]


def model_for(name: str):
    if name != "resnet18":
        return small_model(name)
    # At width 1/16 the 7x7 stem (not prunable: it feeds the residual stream) is 40% of the MACs;
    # at 1/4 the inner block channels carry enough of them for a 50% budget, as at full width.
    torch.manual_seed(0)
    example = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return calibrate_batchnorm(resnet18(width=0.25), example), example


def calibration_for(example: torch.Tensor, n_batches: int = 3, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *example.shape[1:], generator=gen) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def fitted():
    """One fitted pruner per architecture (curves computed once, reused by several tests)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # excluded groups are reported by a warning
        for name in ARCHITECTURES:
            model, example = model_for(name)
            pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8)
            out[name] = (model, example, pruner.fit(model, calibration_for(example)))
    return out


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_half_macs_budget_is_met_and_pruned_equals_masked(name, fitted):
    model, example, pruner = fitted[name]
    result = pruner.prune(macs=0.5)
    macs_before, params_before = count_macs_params(model, example[:1])
    macs_after, params_after = count_macs_params(result.model, example[:1])
    assert (result.macs_before, result.params_before) == (macs_before, params_before)
    assert (result.macs_after, result.params_after) == (macs_after, params_after)
    assert macs_after <= 0.5 * macs_before
    assert params_after < params_before
    with torch.no_grad():
        pruned_out = result.model(example)
        masked_out = masked_copy(model, pruner.graph_, result.plan).eval()(example)
        original_out = model(example)
    assert pruned_out.shape == original_out.shape
    torch.testing.assert_close(pruned_out, masked_out, rtol=1e-4, atol=1e-4 * float(masked_out.abs().max()))
    assert {r.unit for r in result.report} == set(pruner.graph_.names)
    assert all(r.channels_after <= r.channels_before for r in result.report)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_uniform_rates_keep_one_fraction_everywhere(name, fitted):
    model, example, pruner = fitted[name]
    result = pruner.prune(macs=0.5, allocation="uniform")
    assert result.allocation.formulation == "uniform"
    assert result.macs_after <= 0.5 * result.macs_before
    q = result.allocation.info["fraction"]
    for unit, k in result.allocation.keep.items():
        options = pruner.curves_[unit].keep_counts
        fitting = options[options <= q * options[-1] * (1 + 1e-12)]
        assert k == (fitting[-1] if fitting.size else options[0])
    # on the same curves, the MILP's summed error is never above the uniform rates'
    assert pruner.prune(macs=0.5).allocation.objective <= result.allocation.objective + 1e-12
    with torch.no_grad():
        pruned_out = result.model(example)
        masked_out = masked_copy(model, pruner.graph_, result.plan).eval()(example)
    torch.testing.assert_close(pruned_out, masked_out, rtol=1e-4, atol=1e-4 * float(masked_out.abs().max()))
    with pytest.raises(ValueError, match="`allocation` must be"):
        pruner.prune(macs=0.5, allocation="greedy")


def test_unit_problems_are_what_the_curves_solved(fitted):
    _, _, pruner = fitted["mobilenet_v2"]
    assert set(pruner.unit_problems_) == set(pruner.curves_)
    for unit, curve in pruner.curves_.items():
        problem = pruner.unit_problems_[unit]
        assert problem.n_channels == pruner.graph_[unit].n_channels
        for k, error, mask in zip(curve.keep_counts, curve.errors, curve.masks):
            assert mask.sum() == k
            assert error == pytest.approx(problem.objective(mask), rel=1e-6, abs=1e-9)


def test_round_to_keeps_multiples_of_it(fitted):
    model, example, _ = fitted["resnet20"]
    pruner = orprune.Pruner(solver="greedy", round_to=4, progress=False, positions_per_image=8)
    pruner.fit(model, calibration_for(example))
    for unit, curve in pruner.curves_.items():
        width = pruner.graph_[unit].n_channels
        assert all(k % 4 == 0 or k == width for k in curve.keep_counts)
    result = pruner.prune(macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    assert all(r.channels_after % 4 == 0 or r.channels_after == r.channels_before for r in result.report)
    with pytest.raises(ValueError, match="`round_to` must be a positive integer"):
        orprune.Pruner(round_to=0, progress=False).fit(model, [example])


def test_input_model_is_left_unchanged(fitted):
    model, example, pruner = fitted["resnet20"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner.prune(macs=0.4)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_load_round_trip(fitted, tmp_path):
    _, example, pruner = fitted["mobilenet_v2"]
    result = pruner.prune(macs=0.5)
    path = tmp_path / "pruned.pt"
    torch.save(result.model, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(example), result.model(example))


def test_many_budgets_from_one_fit_are_nested_in_cost(fitted):
    _, _, pruner = fitted["resnet20"]
    curves = dict(pruner.curves_)
    results = [pruner.prune(macs=f) for f in (0.8, 0.5, 0.3)]
    assert pruner.curves_ == curves  # allocation only: the curves are not recomputed
    macs = [r.macs_after for r in results]
    assert macs[0] > macs[1] > macs[2]
    assert all(r.macs_after <= f * r.macs_before for r, f in zip(results, (0.8, 0.5, 0.3)))
    # the allocation minimises the summed error, so a looser budget never costs more error
    objectives = [r.allocation.objective for r in results]
    assert objectives[0] <= objectives[1] <= objectives[2]


def test_params_budget_and_both_budgets(fitted):
    _, example, pruner = fitted["vgg11_bn"]
    result = pruner.prune(params=0.6)
    assert result.params_after <= 0.6 * result.params_before
    both = pruner.prune(macs=0.6, params=0.7)
    assert both.macs_after <= 0.6 * both.macs_before and both.params_after <= 0.7 * both.params_before


def test_allocation_is_the_brute_force_optimum_of_the_curves_on_a_tiny_network():
    torch.manual_seed(0)
    model = TinyNet().eval()
    batches = [torch.randn(6, 2, 6, 6) for _ in range(2)]
    pruner = orprune.Pruner(solver="auto", progress=False, positions_per_image=None).fit(model, batches)
    units = list(pruner.curves_)
    assert len(units) == 2
    budget = 0.45 * pruner.costs_.evaluate()["macs"]
    best = np.inf
    for ks in itertools.product(*(pruner.curves_[u].keep_counts for u in units)):
        keep = dict(zip(units, ks))
        if pruner.costs_.macs.evaluate({**pruner.costs_.n_channels, **keep}) <= budget:
            error = sum(pruner.curves_[u].errors[pruner.curves_[u].keep_counts == k][0] for u, k in keep.items())
            best = min(best, error)
    result = pruner.prune(macs=0.45)
    assert result.allocation.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    # exact curves are solved one keep count per task: a process pool gives the serial curves
    pooled = orprune.Pruner(solver="auto", progress=False, positions_per_image=None, n_jobs=2).fit(model, batches)
    _curves_equal(pruner.curves_, pooled.curves_)
    assert result.macs_after <= budget


def _curves_equal(a, b):
    assert a.keys() == b.keys()
    for u in a:
        np.testing.assert_array_equal(a[u].masks, b[u].masks)
        np.testing.assert_allclose(a[u].errors, b[u].errors, rtol=1e-12)


def test_process_pool_and_dask_executors_give_the_serial_result(fitted):
    model, example, serial = fitted["resnet20"]
    batches = calibration_for(example)
    with ProcessPoolExecutor(2) as pool:
        pooled = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8, executor=pool).fit(model, batches)
    _curves_equal(serial.curves_, pooled.curves_)
    spawned = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8, n_jobs=2).fit(model, batches)
    _curves_equal(serial.curves_, spawned.curves_)
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        dasked = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8,
                                executor=client.get_executor()).fit(model, batches)
    _curves_equal(serial.curves_, dasked.curves_)
    torch.testing.assert_close(pooled.prune(macs=0.5).model(example), serial.prune(macs=0.5).model(example))


def test_bad_inputs_raise_clear_errors(fitted):
    model, example, pruner = fitted["resnet20"]
    with pytest.raises(ValueError, match="budget cannot be met"):
        pruner.prune(macs=1e-4)
    with pytest.raises(ValueError, match="give a budget"):
        pruner.prune()
    with pytest.raises(ValueError, match="`macs` must be a fraction"):
        pruner.prune(macs=2.0)
    with pytest.raises(ValueError, match="calibration` is empty"):
        orprune.Pruner(progress=False).fit(model, [])
    nan_batch = example.clone()
    nan_batch[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN|finite"):
        orprune.Pruner(progress=False).fit(model, [nan_batch])
    with pytest.raises(ValueError, match="`solver` must be one of"):
        orprune.Pruner(solver="simplex", progress=False).fit(model, [example])
    with pytest.raises(RuntimeError, match="not fitted"):
        orprune.Pruner().prune(macs=0.5)
    with pytest.raises(ValueError, match="`n_jobs` must be a positive integer"):
        orprune.Pruner(n_jobs=0, progress=False).fit(model, [example])


def test_ignored_layers_are_left_alone(fitted):
    model, example, _ = fitted["resnet20"]
    keep_whole = "layer1.0.conv1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8,
                                ignored_layers=[keep_whole]).fit(model, calibration_for(example))
    assert keep_whole not in pruner.graph_.names
    result = pruner.prune(macs=0.6)
    assert result.model.get_submodule(keep_whole).out_channels == model.get_submodule(keep_whole).out_channels


class WithUnsupported(nn.Module):
    """A conv whose output goes through an op torch-pruning cannot slice channel-wise."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = x.reshape(x.shape[0], 8, -1).transpose(1, 2).reshape(x.shape[0], -1)  # channels interleaved
        return self.head(x[:, : 8 * 16])


def test_modules_that_cannot_be_pruned_are_left_alone_with_a_warning():
    torch.manual_seed(0)
    model = WithUnsupported().eval()
    batches = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    with pytest.warns(UserWarning):
        pruner = orprune.Pruner(solver="greedy", progress=False).fit(model, batches)
    result = pruner.prune(macs=0.9)
    assert result.model(batches[0]).shape == (4, 5)


def test_parallel_refit_mode_also_meets_the_budget_and_matches_masked(fitted):
    model, example, _ = fitted["vgg11_bn"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8,
                                sequential=False).fit(model, calibration_for(example))
    result = pruner.prune(macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    with torch.no_grad():
        torch.testing.assert_close(result.model(example), masked_copy(model, pruner.graph_, result.plan).eval()(example),
                                   rtol=1e-4, atol=1e-4)
