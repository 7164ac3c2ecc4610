"""The command line, end to end on the embedded digits."""

import json

import pytest
import torch

import orprune
from orprune.cli import main
from orprune.examples.zoo import SmallCNN


def test_prune_command_writes_a_smaller_model_and_a_report(tmp_path, capsys):
    torch.manual_seed(0)
    model = SmallCNN(1, 10, widths=(8, 16, 16, 16)).eval()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(path), "--dataset", "digits", "--macs", "0.5", "--calibration", "64",
                 "--solver", "greedy", "-o", str(out), "--evaluate", "--quiet"]) == 0
    pruned = orprune.load(out, SmallCNN(1, 10, widths=(8, 16, 16, 16)))
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    assert 0 <= report["accuracy_after"] <= 1
    assert pruned(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert "MACs" in capsys.readouterr().out
    # uniform rates in multiples of 4
    out4 = tmp_path / "pruned4.pt"
    assert main(["prune", str(path), "--dataset", "digits", "--macs", "0.5", "--calibration", "64", "--solver",
                 "greedy", "--allocation", "uniform", "--round-to", "4", "-o", str(out4), "--quiet"]) == 0
    report = json.loads(out4.with_suffix(".json").read_text())
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    assert all(u["channels_after"] % 4 == 0 for u in report["units"])
    # the allocation on output errors: its objective is the sum of the units' relative output errors
    out_o = tmp_path / "pruned_output.pt"
    assert main(["prune", str(path), "--dataset", "digits", "--macs", "0.5", "--calibration", "64", "--solver",
                 "greedy", "--errors", "output", "-o", str(out_o), "--quiet"]) == 0
    report = json.loads(out_o.with_suffix(".json").read_text())
    assert report["allocation_errors"] == "output" and report["macs_after"] <= 0.5 * report["macs_before"]
    assert report["allocation_objective"] > 0


def test_prune_command_needs_a_budget(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(SmallCNN(1, 10).eval(), path)
    assert main(["prune", str(path), "--dataset", "digits", "-o", str(tmp_path / "x.pt")]) == 2
    assert "give a budget: --macs, --params and/or --latency" in capsys.readouterr().err


def test_bad_fractions_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--macs", "0.5,1.5"])
    assert "fractions must lie in (0, 1]" in capsys.readouterr().err


def test_demo_runs_end_to_end_on_digits(tmp_path, capsys):
    assert main(["demo", "--dataset", "digits", "--epochs", "3", "--macs", "0.5", "--calibration", "256", "--solver", "greedy",
                 "--out", str(tmp_path), "--quiet"]) == 0
    table = (tmp_path / "report.md").read_text()
    assert "orprune (greedy)" in table and "torch-pruning magnitude" in table
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    pruned = [r for r in rows if r["method"].startswith("orprune")]
    assert pruned and all(r["macs_fraction"] <= 0.5 for r in pruned)
    assert (tmp_path / "accuracy_vs_macs.png").stat().st_size > 0


@pytest.mark.parametrize("costs, relative", [(None, False), ("macs", False), (None, True)])
def test_spr_command_trains_thresholds_and_saves(tmp_path, costs, relative):
    out = tmp_path / "spr.pt"
    priced = ([] if costs is None else ["--costs", costs]) + (["--relative"] if relative else [])
    assert main(["spr", "--model", "small_cnn", "--dataset", "digits", "--epochs", "1", "--val-size", "200",
                 "--tolerance", "0.02", "-o", str(out), "--quiet", *priced]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["costs"] == costs
    assert report["relative"] is relative and report["score"] == ("relative_norm" if relative else "norm")
    assert report["macs_after"] <= report["macs_before"]
    assert report["val_accuracy_after"] >= report["val_accuracy_before"] - 0.02 - 1e-12
    assert orprune.load(out)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)  # SmallCNN() narrowed to the saved widths
