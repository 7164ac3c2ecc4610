"""Coverage of issue 21: networks built from concatenations (DenseNet, Inception), grouped convs, fused norms,
LayerNorm / GroupNorm over the channels, token MLPs, ShuffleNetV2 blocks and ``transformers`` vision models
prune to 50% of their MACs (or the best reachable, with the reason), the output shape is unchanged, the input
model is unchanged, and the physically pruned model computes what the masked model computes. The same table for
torch-pruning: ``benchmarks/coverage.py``.

Slow cases (tens of seconds on one core) run with ``ORPRUNE_SLOW=1``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from orprune.examples.coverage import orprune_coverage
from orprune.examples.coverage_zoo import CASES, TRANSFORMERS_CASES
from tests.models import one_thread  # noqa: F401  (module fixture)

slow = pytest.mark.skipif(not os.environ.get("ORPRUNE_SLOW"), reason="slow: set ORPRUNE_SLOW=1")
transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

#: Cases that cannot reach 50% of the MACs, and why (the unpruned groups).
BEST_REACHABLE: dict[str, str] = {}
SLOW = {"hf_mobilenet_v2", "hf_efficientnet"}


def _check(name: str, make) -> None:
    model, batches = make()
    record = orprune_coverage(model, batches, macs=0.5)
    assert record.success, record.reason
    assert record.shape_kept and record.input_unchanged
    assert record.max_abs_difference < 1e-4  # pruned == masked
    if name in BEST_REACHABLE:
        assert record.target > 0.5 and record.reason  # the best reachable, with the excluded groups
    else:
        assert record.target == 0.5 and record.macs <= 0.5


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_written_networks(name):
    _check(name, CASES[name])


@transformers
@pytest.mark.parametrize("name", [pytest.param(n, marks=slow) if n in SLOW else n for n in sorted(TRANSFORMERS_CASES)])
def test_transformers_vision_models(name):
    _check(name, TRANSFORMERS_CASES[name])


@transformers
def test_hf_resnet_below_the_target_is_the_allocations_optimum():
    """hf_resnet keeps ~39% of its MACs for a 50% target. Not a pricing error: the cost model equals the counted
    MACs, and the MILP's keep counts are the brute-force minimum of the summed curve errors over every allocation
    within the budget. The 7x7 embedder conv holds ~92% of the MACs in 8 channels (each ~12% of the MACs): 4 of
    them with everything else whole is above 50%, so meeting 50% with 4 costs more summed error than keeping 3."""
    import itertools

    import numpy as np

    from orprune.network.costs import count_macs_params
    from orprune.pipeline import Pruner

    model, batches = TRANSFORMERS_CASES["hf_resnet"]()
    pruner = Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches)
    result = pruner.prune(macs=0.5)
    keep = dict(result.allocation.keep)
    counted = count_macs_params(result.model, pruner.example_inputs_)[0]
    assert pruner.costs_.evaluate(keep)["macs"] == pytest.approx(counted, rel=1e-12)
    assert counted / pruner.macs_before_ < 0.45  # well below the target: what this test explains
    names, budget = list(pruner.curves_), 0.5 * pruner.macs_before_
    curves = [pruner.curves_[n] for n in names]
    best, best_keep = np.inf, None
    for picks in itertools.product(*[range(len(c.keep_counts)) for c in curves]):
        option = {n: int(c.keep_counts[i]) for n, c, i in zip(names, curves, picks)}
        error = sum(c.errors[i] for c, i in zip(curves, picks))
        if error < best - 1e-12 and pruner.costs_.evaluate(option)["macs"] <= budget:
            best, best_keep = error, option
    assert keep == best_keep
    assert result.allocation.objective == pytest.approx(best, rel=1e-9)
    embedder = next(n for n in names if "embedder" in n)
    whole = {n: int(pruner.curves_[n].keep_counts[-1]) for n in names}
    one_more = pruner.costs_.evaluate({**whole, embedder: keep[embedder] + 1})["macs"]
    assert one_more > budget  # the next embedder count needs the rest of the network pruned
    assert one_more - pruner.costs_.evaluate({**whole, embedder: keep[embedder]})["macs"] > 0.1 * pruner.macs_before_
