"""Output-space error curves (`Pruner(errors="output")`): measured right, and what the allocation sums."""

import itertools
import warnings

import numpy as np
import pytest
import torch

import orprune
from orprune.budget.output_errors import probe_batches
from orprune.network.surgery import PruningPlan, apply_pruning
from tests.models import TinyNet, one_thread, small_model  # noqa: F401  (one_thread: module fixture)


def _calibration(example, n_batches=3, batch=8):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(batch, *example.shape[1:], generator=gen) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def fitted():
    model, example = small_model("resnet20")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8, max_options=4,
                                errors="output", probe_images=12)
        pruner.fit(model, _calibration(example))
    return model, example, pruner


def test_curves_are_aligned_nonnegative_and_zero_at_full_width(fitted):
    _, _, pruner = fitted
    assert set(pruner.output_errors_) == set(pruner.curves_)
    for unit in pruner.graph_.units:
        errors, counts = pruner.output_errors_[unit.name], pruner.curves_[unit.name].keep_counts
        assert errors.shape == counts.shape
        assert np.all(np.isfinite(errors)) and np.all(errors >= 0)
        assert np.all(errors[counts == unit.n_channels] == 0)
        assert np.any(errors[counts < unit.n_channels] > 0)


def test_each_error_is_that_of_the_physically_pruned_network(fitted):
    """Recomputed through the surgery (channels removed, not masked) on the probe images."""
    model, example, pruner = fitted
    probe = torch.cat(pruner.batches_[:2])  # probe_images=12 with batches of 8: the first two
    with torch.no_grad():
        reference = model(probe).double()
    for unit in pruner.graph_.units:
        curve = pruner.curves_[unit.name]
        for i, k in enumerate(curve.keep_counts):
            if k == unit.n_channels:
                continue
            kept = np.flatnonzero(curve.mask_for(int(k)))
            plan = PruningPlan({unit.name: kept}, pruner._unit_updates(unit.name, kept))
            pruned = apply_pruning(model, pruner.graph_, plan, example[:1]).eval()
            with torch.no_grad():
                out = pruned(probe).double()
            expected = float(((out - reference) ** 2).sum() / (reference**2).sum())
            assert pruner.output_errors_[unit.name][i] == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_allocation_minimises_the_summed_output_errors():
    """On a network small enough to enumerate: the MILP's choice is the brute-force optimum of the
    output curves (not of the layer curves)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    batches = [torch.randn(6, 2, 6, 6) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # conv3 reaches the output: left unpruned
        pruner = orprune.Pruner(solver="auto", progress=False, positions_per_image=None, errors="output").fit(model, batches)
    units = list(pruner.curves_)
    budget = 0.45 * pruner.costs_.evaluate()["macs"]
    best = np.inf
    for ks in itertools.product(*(pruner.curves_[u].keep_counts for u in units)):
        keep = dict(zip(units, ks))
        if pruner.costs_.macs.evaluate({**pruner.costs_.n_channels, **keep}) <= budget:
            error = sum(pruner.output_errors_[u][pruner.curves_[u].keep_counts == k][0] for u, k in keep.items())
            best = min(best, error)
    result = pruner.prune(macs=0.45)
    assert result.allocation.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert result.macs_after <= budget


def test_layer_errors_leave_no_output_curves(fitted):
    model, example, _ = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8, max_options=4)
        pruner.fit(model, _calibration(example))
    assert pruner.output_errors_ is None


def test_probe_batches_take_enough_images():
    batches = [torch.zeros(8, 1) for _ in range(4)]
    assert len(probe_batches(batches, 1)) == 1
    assert len(probe_batches(batches, 9)) == 2
    assert len(probe_batches(batches, 1000)) == 4
    with pytest.raises(ValueError, match="probe_images"):
        probe_batches(batches, 0)


@pytest.mark.parametrize("kwargs, match", [({"errors": "logits"}, "errors"), ({"probe_images": 0}, "probe_images"),
                                           ({"probe_images": True}, "probe_images")])
def test_bad_options_raise(fitted, kwargs, match):
    model, example, _ = fitted
    with pytest.raises(ValueError, match=match):
        orprune.Pruner(progress=False, **kwargs).fit(model, _calibration(example))
