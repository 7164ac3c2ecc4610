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
