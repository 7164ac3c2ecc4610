"""``n_jobs=None``: a process pool only when the curves' estimated serial time pays for its start-up."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch

import orprune
from orprune import _pipeline_steps as steps
from orprune._pipeline_steps import AUTO_POOL_SECONDS, estimated_curve_seconds, parallel_jobs
from tests.models import one_thread, small_model  # noqa: F401  (module fixture)


def _problem(c: int, g: int) -> orprune.LayerProblem:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4 * c * g, c * g))
    return orprune.LayerProblem.from_arrays(x, x @ rng.standard_normal((c * g, 3)), group_size=g)


def test_estimate_grows_with_the_layer_and_ignores_bounded_solvers():
    small, wide = _problem(8, 2), _problem(32, 2)
    assert estimated_curve_seconds(wide, "path") == pytest.approx(estimated_curve_seconds(small, "path") * 4**3)
    assert estimated_curve_seconds(wide, "greedy") > estimated_curve_seconds(small, "greedy") > 0
    assert estimated_curve_seconds(wide, "exact") == 0.0


def test_serial_below_the_threshold_and_one_worker_per_core_above():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert parallel_jobs(AUTO_POOL_SECONDS, 100) == 1
    assert parallel_jobs(10 * AUTO_POOL_SECONDS, 100) == min(cores, 8)
    assert parallel_jobs(10 * AUTO_POOL_SECONDS, 1) == 1  # one task: nothing to share


def test_small_models_stay_serial_and_a_forced_pool_gives_the_serial_curves(monkeypatch):
    model, example = small_model("resnet20")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, *example.shape[1:], generator=gen) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        serial = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches)
        assert serial.n_jobs_used_ == 1
        monkeypatch.setattr(steps, "AUTO_POOL_SECONDS", -1.0)  # every fit "large": the automatic pool runs
        pooled = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches)
    if parallel_jobs(1.0, 2) == 1:
        pytest.skip("one usable core: the automatic pool never starts")
    assert pooled.n_jobs_used_ > 1
    for u in serial.curves_:
        np.testing.assert_array_equal(serial.curves_[u].masks, pooled.curves_[u].masks)
        np.testing.assert_allclose(serial.curves_[u].errors, pooled.curves_[u].errors, rtol=1e-12)


@pytest.mark.parametrize(("source", "safe"), [
    ("import orprune\norprune.prune(model, data, macs=0.5)\n", False),
    ("def main():\n    ...\n\nif __name__ == '__main__':\n    main()\n", True),
    ('if __name__ == "__main__":\n    main()\n', True),
])
def test_no_automatic_pool_for_a_script_without_the_main_guard(tmp_path, monkeypatch, source, safe):
    """Spawned workers import the main module: an unguarded script would run again in each of them."""
    script = tmp_path / "user_script.py"
    script.write_text(source)
    fake_main = type(sys)("__main__")
    fake_main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    assert steps.spawn_safe_main() is safe
    assert (parallel_jobs(10 * AUTO_POOL_SECONDS, 100) == 1) or safe
    del fake_main.__file__  # interactive session / notebook: nothing to re-run
    assert steps.spawn_safe_main()
