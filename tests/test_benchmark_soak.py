"""The soak benchmark's pieces: random networks trace and prune, a broken run is counted as a failure."""

import random

import torch

from benchmarks import soak
from tests.models import one_thread  # noqa: F401  (module fixture)


def test_random_networks_run_and_prune_cleanly():
    for seed in (0, 1, 2):
        model, in_channels = soak.random_network(random.Random(seed))
        assert model(torch.randn(2, in_channels, 8, 8)).ndim == 2
    row = soak.one_run(3)
    assert row["outcome"] in ("ok", "infeasible"), row["detail"]


def test_a_broken_run_is_a_failure(monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(soak.orprune.Pruner, "fit", broken)
    row = soak.one_run(0)
    assert row["outcome"] == "failure" and "RuntimeError: boom" in row["detail"]


def test_help_runs(capsys):
    try:
        soak.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--networks" in capsys.readouterr().out
