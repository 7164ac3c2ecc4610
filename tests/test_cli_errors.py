"""A new user's mistakes on the command line: one line on stderr, exit status 2, no traceback (``--debug``
shows it); Ctrl-C: one line, status 130, no process left; results load in a fresh process."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import orprune
from orprune.cli import main
from orprune.examples.zoo import SmallCNN
from tests.models import one_thread  # noqa: F401  (module fixture)
from tests.test_pipeline_inputs import alive, interrupt_group

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str) -> tuple[int, str]:
    """Exit status and stderr of ``orprune ARGS`` run in this process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


def one_line_error(code: int, err: str, match: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error:" in lines[0] and match in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(SmallCNN(1, 10, widths=(4, 8, 8, 8)).eval(), root / "model.pt")
    torch.save(SmallCNN(3, 10, widths=(4, 8, 8, 8)).eval(), root / "rgb.pt")
    (root / "trunc.pt").write_bytes((root / "model.pt").read_bytes()[:1000])
    (root / "notes.txt").write_text("not a model\n")
    # a model whose class was defined in the user's training script: pickled as __main__.MyCNN
    (root / "mynet.py").write_text(
        "from torch import nn\n\n"
        "class MyCNN(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(6 * 4 * 4, 10))\n\n"
        "def batches():\n"
        "    import torch\n"
        "    return [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]\n\n"
        "if __name__ == '__main__':\n"
        "    raise SystemExit('training code must not run on import')\n")
    sys.path.insert(0, str(root))
    try:
        import mynet
        mynet.MyCNN.__module__ = "__main__"
        sys.modules["__main__"].MyCNN = mynet.MyCNN  # only while pickling: then it is gone, as in a fresh process
        torch.save(mynet.MyCNN().eval(), root / "script_model.pt")
    finally:
        vars(sys.modules["__main__"]).pop("MyCNN", None)
        sys.path.remove(str(root))
        sys.modules.pop("mynet", None)
    np.save(root / "calib.npy", np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32))
    return root


@pytest.mark.parametrize("args, match", [
    (["prune", "{root}/missing.pt"], "model file {root}/missing.pt does not exist"),
    (["prune", "{root}/trunc.pt"], "is not a file written by torch.save, or it is truncated"),
    (["prune", "{root}/notes.txt"], "is not a file written by torch.save"),
    (["prune", "{root}/script_model.pt"], "class MyCNN is not in the script that saved it; torch.save(model) "
                                          "stores the class by name, so loading needs its definition: pass "
                                          "--model-module"),
    (["prune", "{root}/rgb.pt"], "`model` does not run on the `calibration` inputs (one input of shape (1, 1, 8, 8))"),
    (["prune", "{root}/model.pt", "--solver", "foo"], "argument --solver: invalid choice: 'foo'"),
    (["prune", "{root}/model.pt", "--calibration", "0"], "argument --calibration: must be >= 1"),
    (["prune", "{root}/model.pt", "--calibration", "-3"], "argument --calibration: must be >= 1"),
    (["prune", "{root}/model.pt", "--macs", "1.5"], "argument --macs: must be a fraction in (0, 1]"),
    (["prune", "{root}/model.pt", "--macs", "nan"], "argument --macs: must be a fraction in (0, 1]"),
    (["prune", "{root}/model.pt", "--macs", "0"], "argument --macs: must be a fraction in (0, 1]"),
    (["prune", "{root}/model.pt", "-o", "{root}/nodir/p.pt"], "folder {root}/nodir does not exist"),
    (["prune", "{root}/model.pt", "--data", "{root}/nothing.npy"], "data file {root}/nothing.npy does not exist"),
    (["prune", "{root}/model.pt", "--data", "{root}/mynet.py:nothing"], "has no function 'nothing'"),
    (["prune", "{root}/model.pt", "--data", "{root}/calib.npy", "--evaluate"], "--evaluate with --data needs"),
    (["spr", "--epochs", "0", "-o", "{root}/s.pt"], "argument --epochs: must be a finite number > 0"),
    (["spr", "--init", "{root}/notes.txt", "-o", "{root}/s.pt"], "is not a file written by torch.save"),
    (["demo", "--calibration", "0"], "argument --calibration: must be >= 1"),
])
def test_user_errors_are_one_line_and_status_2(files, args, match):
    defaults = ["--macs", "0.5", "--dataset", "digits", "-o", "{root}/out.pt", "--quiet"] if args[0] == "prune" else []
    given = set(args)
    extra = [a for i, a in enumerate(defaults) if not (a.startswith("-") and a in given)
             and not (i and defaults[i - 1].startswith("-") and defaults[i - 1] in given)]
    if "--data" in given:
        extra = [a for i, a in enumerate(extra) if a != "--dataset" and (not i or extra[i - 1] != "--dataset")]
    code, err = cli(*(a.format(root=files) for a in args + extra))
    one_line_error(code, err, match.format(root=files))
    assert not (files / "out.pt").exists()


def test_model_module_loads_a_class_from_the_users_script(files):
    out = files / "from_script.pt"
    code, err = cli("prune", str(files / "script_model.pt"), "--model-module", str(files / "mynet.py"),
                    "--data", f"{files / 'mynet.py'}:batches", "--macs", "0.6", "--solver", "greedy", "-o", str(out),
                    "--quiet")
    assert code == 0, err
    assert "Traceback" not in err and "warning" not in err.lower(), err  # nothing the user could act on
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["macs_after"] <= 0.6 * report["macs_before"] and report["calibration_inputs"] == 48


@pytest.mark.parametrize("kind", ["npy", "pt", "folder"])
def test_prune_calibrates_on_the_users_data(files, tmp_path, kind):
    x = torch.rand(24, 1, 8, 8)
    y = torch.arange(24) % 2
    if kind == "npy":
        spec = files / "calib.npy"
    elif kind == "pt":
        spec = tmp_path / "data.pt"
        torch.save({"images": x, "labels": y}, spec)
    else:
        from PIL import Image

        spec = tmp_path / "images"
        for i, (image, label) in enumerate(zip(x, y)):
            (spec / f"class{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(spec / f"class{label}" / f"{i}.png")
    out = tmp_path / "p.pt"
    evaluate = [] if kind == "npy" else ["--eval-data", str(spec), "--evaluate"]
    code, err = cli("prune", str(files / "model.pt"), "--data", str(spec), "--macs", "0.5", "--solver", "greedy",
                    "-o", str(out), "--quiet", "--calibration", "20", *evaluate)
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["calibration_inputs"] == 20 and report["macs_after"] <= 0.5 * report["macs_before"]
    if evaluate:  # an untrained model on 2 balanced classes: the warning says it is at chance
        assert report["test_inputs"] == 24 and "near chance" in err and "WARNING" in err


def test_errors_in_a_fresh_process_and_debug_shows_the_traceback(files, tmp_path):
    command = [sys.executable, "-m", "orprune.cli", "prune", str(files / "script_model.pt"), "--dataset", "digits",
               "--macs", "0.5", "-o", str(tmp_path / "p.pt")]
    run = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)
    one_line_error(run.returncode, run.stderr, "--model-module")
    run = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 2 and "Traceback" in run.stderr and "UsageError" in run.stderr


def test_cli_result_loads_in_a_fresh_process_with_plain_torch_load(files, tmp_path):
    out = tmp_path / "p.pt"
    code, err = cli("prune", str(files / "model.pt"), "--dataset", "digits", "--calibration", "64", "--macs", "0.5",
                    "--solver", "greedy", "-o", str(out), "--quiet")
    assert code == 0, err
    assert "orprune.load" in json.loads(out.with_suffix(".json").read_text())["load"]
    script = ("import sys, torch, orprune\n"
              "from orprune.examples.zoo import SmallCNN\n"
              f"data = torch.load({str(out)!r})\n"  # torch's default: weights_only=True
              f"model = orprune.load({str(out)!r}, SmallCNN(1, 10, widths=(4, 8, 8, 8)))\n"
              "print(sum(p.numel() for p in model.parameters()), data['format'])\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert run.stdout.split() == [str(report["params_after"]), orprune.network.saving.FORMAT]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups and SIGINT")
@pytest.mark.parametrize("jobs", [None, 2])
def test_ctrl_c_exits_130_with_one_line_and_no_process_left(tmp_path, jobs):
    # exact curves of units of 16 and 32 channels: ~100 solves of up to 1 s each, interrupted after 2 s
    torch.save(SmallCNN(1, 10, widths=(16, 32, 32, 32)).eval(), tmp_path / "cnn.pt")
    command = [sys.executable, "-m", "orprune.cli", "prune", str(tmp_path / "cnn.pt"), "--dataset", "digits",
               "--calibration", "64", "--macs", "0.5", "--solver", "exact", "-o", str(tmp_path / "p.pt")]
    command += [] if jobs is None else ["--jobs", str(jobs)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)  # its own group: a terminal's Ctrl-C reaches the whole group
    def ready():
        seen = ""
        while "error curves" not in seen:  # the progress bar of the curves: the pool is up
            char = proc.stderr.read(1)
            assert char, seen
            seen += char

    children, err, took = interrupt_group(proc, ready, settle=2.0)
    assert jobs is None or len(children) >= jobs
    assert proc.returncode == 130, err
    assert took < 3.0, err  # measured 0.5-1.7 s at a load average of 12 on 2 cores
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last == "orprune prune: interrupted" and "Traceback" not in err, err
    time.sleep(0.5)
    assert not alive(children)
    assert not (tmp_path / "p.pt").exists()
