"""``orprune trp``: trains with TRP on the digits, decomposes, saves a loadable model and a report; user errors."""

import json

import pytest
import torch

from orprune.cli import main
from orprune.examples.zoo import SmallCNN
from tests.models import one_thread  # noqa: F401  (module fixture)
from tests.test_cli_errors import cli, one_line_error

SMALL = ["--model", "small_cnn", "--dataset", "digits", "--epochs", "2", "--train-size", "400", "--quiet"]


@pytest.mark.parametrize("calibration", [0, 128])
def test_trp_command_trains_decomposes_and_saves(tmp_path, calibration):
    out = tmp_path / "trp.pt"
    assert main(["trp", *SMALL, "--energy", "0.8", "--nuclear", "1e-3", "--calibration", str(calibration),
                 "--ignore-classifier", "-o", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["decomposition"] == ("select_rank" if calibration else "svd")
    assert report["ignored_layers"] == ["classifier"] and "classifier" not in report["ranks"]
    assert report["macs_after"] < report["macs_before"]  # energy 0.8 leaves ranks that save MACs
    model = torch.load(out, weights_only=False)
    split = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Sequential) and n.startswith("features.")
             and len(m) == 2 and all(isinstance(c, torch.nn.Conv2d) for c in m)]
    assert split, "no layer was split in two"
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    if not calibration:  # the SVD of weights already truncated to that rank: decomposition changes nothing
        assert report["test_accuracy_final"] == pytest.approx(report["test_accuracy_trained"], abs=1 / 360 + 1e-12)


def test_trp_starts_from_a_saved_model(tmp_path):
    init = tmp_path / "init.pt"
    torch.manual_seed(0)
    torch.save(SmallCNN(1, 10, widths=(4, 8, 8, 8)).eval(), init)
    out = tmp_path / "trp.pt"
    assert main(["trp", *SMALL, "--epochs", "1", "--init", str(init), "-o", str(out)]) == 0
    model = torch.load(out, weights_only=False)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("args, match", [
    (["--energy", "1.5"], "--energy must lie in (0, 1]"),
    (["--energy", "0"], "argument --energy: must be a finite number > 0"),
    (["--epochs", "0"], "argument --epochs: must be a finite number > 0"),
    (["--nuclear", "-1"], "argument --nuclear: must be a finite number >= 0"),
    (["--period", "0"], "argument --period: must be >= 1"),
    (["--calibration", "-5"], "--calibration must be >= 0 images"),
    (["--init", "{root}/missing.pt"], "model file {root}/missing.pt does not exist"),
    (["-o", "{root}/nodir/t.pt"], "folder {root}/nodir does not exist"),
])
def test_user_errors_are_one_line_and_status_2(tmp_path, args, match):
    given = [a.format(root=tmp_path) for a in args]
    output = [] if "-o" in args else ["-o", str(tmp_path / "t.pt")]
    code, err = cli("trp", "--dataset", "digits", "--quiet", *given, *output)
    one_line_error(code, err, match.format(root=tmp_path))
    assert not (tmp_path / "t.pt").exists()
