"""The trained concat / grouped-conv / channel-shuffle benchmark's rows (``benchmarks/cnn_accuracy.py``), on
untrained small networks and random images: every library's row meets the budget, orprune's pruned model equals
the masked one, the input model is unchanged, and the summary pairs each library's best row; on ShuffleNetV2,
where torch-pruning 1.6 fails, its rows and the summary carry the error."""

from __future__ import annotations

import argparse

import pytest
import torch

import benchmarks.cnn_accuracy as ca
from orprune.examples.coverage_zoo import DenseNet, ResNeXt, ShuffleNetV2, randomize_batchnorm
from tests.models import one_thread  # noqa: F401  (module fixture)

NETS = {"densenet_small": lambda: DenseNet(growth=4, n_layers=2, stem=8, n_classes=10, in_channels=1),
        "resnext_small": lambda: ResNeXt(stem=8, width=16, out_channels=16, groups=4, n_classes=10, in_channels=1,
                                         stride=2),
        "shufflenet_small": lambda: ShuffleNetV2(widths=(16, 32), n_classes=10, in_channels=1)}


@pytest.fixture
def stubbed(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(192, 1, 12, 12, generator=gen), torch.randint(0, 10, (192,), generator=gen)

    def trained_model(name, epochs, channels_last):
        torch.manual_seed(0)
        return randomize_batchnorm(NETS[name]()), {"test_accuracy": 0.1, "epochs": epochs, "train_seconds": 0.0}

    monkeypatch.setattr(ca, "trained_model", trained_model)
    monkeypatch.setattr(ca, "load_default", lambda split: (images, labels, "random"))


@pytest.mark.parametrize("name", ["densenet_small", "resnext_small"])
def test_rows_meet_the_budget_and_pruned_equals_masked(stubbed, name):
    args = argparse.Namespace(epochs=1, calibration=128, solvers="greedy", test_size=96)
    rows, info = ca.run_network(name, args, [0.5])
    assert info["input_unchanged"]
    methods = {r.method for r in rows if r.accuracy is not None}
    assert {"unpruned", "orprune greedy", "orprune greedy + BN re-estimation", "torch-pruning magnitude",
            "torch-pruning magnitude + BN re-estimation", "torch-pruning taylor"} <= methods
    for r in rows:
        if r.method == "unpruned":
            continue
        assert r.macs is not None and r.macs <= 0.5 + 1e-9, r
        if r.method == "orprune greedy":
            assert float(r.note.split()[-1]) < 1e-4  # pruned vs masked
    summary = ca.summary(rows, [0.5])
    assert len(summary) == 3 and "orprune greedy" in summary[2] and "torch-pruning" in summary[2]


def test_shufflenet_torch_pruning_failure_is_a_row(stubbed):
    """torch-pruning 1.6 raises on ShuffleNetV2's shuffles (IndexError): the table keeps a "failed: ..." row per
    importance and the summary says so; orprune prunes the stage units, tied by their chunks, to the budget."""
    args = argparse.Namespace(epochs=1, calibration=128, solvers="greedy", test_size=96)
    rows, info = ca.run_network("shufflenet_small", args, [0.5])
    assert info["input_unchanged"] and "chain(s)" in info["graph"]
    failed = [r for r in rows if r.method.startswith("torch-pruning")]
    assert [r.method for r in failed] == ["torch-pruning magnitude", "torch-pruning taylor"]
    assert all(r.accuracy is None and r.note.startswith("failed: ") for r in failed)
    ours = next(r for r in rows if r.method == "orprune greedy")
    assert ours.macs <= 0.5 + 1e-9 and float(ours.note.split()[-1]) < 1e-4
    summary = ca.summary(rows, [0.5])
    assert len(summary) == 3 and "orprune greedy" in summary[2] and "torch-pruning failed: " in summary[2]
