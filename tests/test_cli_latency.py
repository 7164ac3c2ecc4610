"""``orprune prune --latency``: the budget on measured latency tables (timer mocked), reported in the JSON."""

import json

import pytest
import torch
import torch.nn as nn

import orprune._latency_loop as latency_loop_module
import orprune.network.latency as latency_module
from orprune.cli import main
from orprune.examples.zoo import SmallCNN


def fake_fastest_time(module: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    if isinstance(module, nn.Conv2d):
        return 1e-4 * module.in_channels * module.out_channels * x.shape[0]
    return 1e-3 * x.shape[0] if not isinstance(module, nn.Module) or len(list(module.children())) else 1e-5


def test_prune_command_with_a_latency_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(latency_module, "fastest_time", fake_fastest_time)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(SmallCNN(1, 10, widths=(8, 16, 16, 16)).eval(), path)
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(path), "--dataset", "digits", "--latency", "0.6", "--batch-size", "4", "--threads", "1",
                 "--latency-rounds", "0", "--calibration", "64", "--solver", "greedy", "-o", str(out), "--quiet"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())["latency"]
    assert report["batch_size"] == 4 and report["threads"] == 1
    assert report["predicted_fraction"] <= 0.6 + 1e-12
    assert report["budget"] == pytest.approx(0.6 * report["table_full"])
    assert "latency (batch 4" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "orprune" / "latency").glob("latency-*.json"))


def test_prune_command_accepts_latency_as_the_only_budget(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(SmallCNN(1, 10).eval(), path)
    assert main(["prune", str(path), "--dataset", "digits", "-o", str(tmp_path / "x.pt")]) == 2
    assert "--latency" in capsys.readouterr().err


def test_prune_command_measures_rounds_until_the_budget_is_met(tmp_path, monkeypatch):
    monkeypatch.setattr(latency_module, "fastest_time", fake_fastest_time)
    # the measured model: its convs' table times plus an overhead the tables spread in proportion
    monkeypatch.setattr(latency_loop_module, "call_times", lambda models, x, repeats, warmup=3, statistic="min": [
        5e-3 + sum(fake_fastest_time(m, x) for m in model.modules() if isinstance(m, nn.Conv2d)) for model in models])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    torch.save(SmallCNN(1, 10, widths=(8, 16, 16, 16)).eval(), path)
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(path), "--dataset", "digits", "--latency", "0.5", "--batch-size", "4",
                 "--latency-rounds", "3", "--calibration", "64", "--solver", "greedy", "-o", str(out), "--quiet"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())["latency"]
    assert report["rounds"] and report["rounds"][0]["table_fraction"] == 0.5
    assert report["measured_fraction"] <= 0.5


def test_latency_rounds_must_be_a_whole_number(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(SmallCNN(1, 10).eval(), path)
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(path), "--latency", "0.5", "--latency-rounds", "-1", "-o", str(tmp_path / "x.pt")])
    assert exit_.value.code == 2
    assert "--latency-rounds: must be >= 0" in capsys.readouterr().err
