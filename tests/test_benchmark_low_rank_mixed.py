"""The channels / factorize / mixed / guard benchmark (``benchmarks/low_rank_mixed.py``) end to end on tiny sizes:
the ``--dataset`` switch reaches the training, the cache name and the results header (with the real sizes), every
row meets its MACs budget, the guard row is the candidate with the smallest probe error, and each built
model is fine-tuned once however many modes chose it.

ResNet-20 itself is replaced by a narrow ResNet-8 (same code path, same layer names) and the cache by a temporary
directory, so one run takes a few seconds and nothing is written under ``benchmarks/``."""

from __future__ import annotations

import re

import pytest

import benchmarks.low_rank as low_rank
import benchmarks.low_rank_mixed as lrm
from orprune.examples.datasets import fashion_mnist_available
from orprune.examples.zoo import CifarResNet
from orprune.training import train
from tests.models import one_thread  # noqa: F401  (module fixture)

SPLITS = {"digits": (1437, 360), "fashion-mnist": (60000, 10000)}  # train / test images of each dataset


@pytest.fixture
def tiny_resnet(monkeypatch, tmp_path):
    monkeypatch.setattr(low_rank, "resnet20", lambda num_classes, in_channels: CifarResNet(
        8, num_classes, in_channels, widths=(4, 8, 8)))
    monkeypatch.setattr(low_rank, "CACHE_DIR", tmp_path / "cache")
    return tmp_path


def table(text: str) -> list[dict[str, str]]:
    """The results table's rows as ``{column: cell}``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.mark.parametrize("dataset", ["digits", "fashion-mnist"])
def test_dataset_switch_sizes_and_guard_row(tiny_resnet, monkeypatch, dataset):
    if dataset == "fashion-mnist" and not fashion_mnist_available():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    tuned_models = []
    monkeypatch.setattr(lrm, "train", lambda model, *a, **k: tuned_models.append(model) or train(model, *a, **k))
    out = tiny_resnet / "results.md"
    rows = lrm.main(["--dataset", dataset, "--train-size", "256", "--epochs", "2", "--calibration", "64",
                     "--probe", "32", "--test-size", "50", "--macs", "0.3", "--latency-batch", "8",
                     "--latency-repeats", "2", "--finetune-epochs", "0.5", "--output", str(out)])
    text = out.read_text()
    n_split, _ = SPLITS[dataset]
    assert text.splitlines()[0].endswith(f"resnet20 on {dataset}")
    assert f"--dataset {dataset}" in text  # the command line that produced the file
    assert f"trained 2 epochs on the first 256 of the {n_split} training images" in text
    assert "on 50 test images (one image is 2.00%)" in text
    assert "the next 32 training images" in text
    assert (tiny_resnet / "cache" / f"resnet20_{dataset}_n256_e2_s0.pt").is_file()

    (guard,) = [r for r in rows if r["mode"].startswith("guard -> ")]
    candidates = [r for r in rows if not r["mode"].startswith("guard")]
    assert {"mixed", "channels", "factorize", "calibrated"} <= {r["mode"] for r in candidates}
    probes = [r["probe"] for r in candidates]
    assert len(set(probes)) > 1  # the candidates differ, so the minimum below means something
    assert guard["probe"] == min(probes)
    for mode in guard["mode"].removeprefix("guard -> ").split("/"):  # the guard's model is the chosen modes' own
        (row,) = [r for r in candidates if r["mode"] == mode]
        assert row["model"] is guard["model"] and row["acc"] == guard["acc"]
        assert row["tuned"] == guard["tuned"]
    assert all(0.0 <= r["tuned"] <= 1.0 for r in rows)
    assert len(tuned_models) == len({id(r["model"]) for r in rows})  # one fine-tune per built model
    table_rows = table(text)
    assert [r["mode"] for r in table_rows] == [r["mode"] for r in rows]
    assert float(table_rows[-1]["probe error"]) == pytest.approx(guard["probe"], abs=5e-5)
    for r in rows:
        assert r["macs"] <= 0.3 + 1e-9
    for r in table_rows:
        assert re.fullmatch(r"\d+\.\d\d%", r["test accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["--probe", "0"], "--probe"),
    (["--test-size", "-3"], "--test-size"),
    (["--calibration", "5000"], "no held-out probe images"),  # the digits' train split has 1437 images
])
def test_bad_sizes_are_refused(tiny_resnet, capsys, argv, message):
    with pytest.raises(SystemExit):
        lrm.main(argv + ["--output", str(tiny_resnet / "x.md")])
    assert message in capsys.readouterr().err
    assert not (tiny_resnet / "cache").exists()  # refused before any training
