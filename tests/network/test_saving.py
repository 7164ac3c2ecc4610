"""orprune.save / orprune.load: a pruned model loads in a fresh process with plain ``torch.load`` settings."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import orprune
from orprune.examples.zoo import SmallCNN, resnet20
from tests.models import one_thread  # noqa: F401  (module fixture)

ROOT = Path(__file__).resolve().parents[2]


def pruned(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    calibration = [torch.randn(8, *shape)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cheap settings: what is saved matters here, not how well it was pruned
        return orprune.prune(model.eval(), calibration, macs=0.5, solver="greedy", progress=False, sequential=False,
                             positions_per_image=4, max_options=4).model


@pytest.mark.parametrize("build", [lambda: SmallCNN(1, 10, widths=(8, 16, 16, 16)), lambda: resnet20(in_channels=1)])
def test_load_rebuilds_the_pruned_widths_on_a_fresh_instance(tmp_path, build):
    small = pruned(build(), (1, 8, 8))
    path = tmp_path / "pruned.pt"
    orprune.save(small, path)
    data = torch.load(path)  # the default weights_only=True reads it
    assert data["format"] == orprune.network.saving.FORMAT
    loaded = orprune.load(path, build())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())
    assert not loaded.training


def test_a_fresh_process_loads_with_default_torch_load(tmp_path):
    small = pruned(SmallCNN(1, 10, widths=(8, 16, 16, 16)), (1, 8, 8))
    path = tmp_path / "pruned.pt"
    orprune.save(small, path)
    x = torch.randn(2, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, orprune
        x = torch.load({str(tmp_path / 'x.pt')!r})
        model = orprune.load({str(path)!r})  # SmallCNN() rebuilt by name, narrowed to the saved widths
        torch.save(model(x), {str(tmp_path / 'y.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), small(x), rtol=0, atol=0)


def test_load_errors_say_what_to_do(tmp_path):
    class Local(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3)

        def forward(self, x):
            return self.conv(x)

    path = tmp_path / "m.pt"
    orprune.save(Local(4), path)
    with pytest.raises(ValueError, match=r"pass `model=`"):
        orprune.load(path)  # a local class with a required argument cannot be rebuilt by name
    torch.testing.assert_close(orprune.load(path, Local(9)).conv.weight.shape, torch.Size([4, 1, 3, 3]))
    with pytest.raises(ValueError, match=r"has no module\(s\) \['conv'\]"):
        orprune.load(path, nn.Sequential(nn.Conv2d(1, 4, 3)))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not written by orprune.save"):
        orprune.load(tmp_path / "plain.pt", Local(4))
    with pytest.raises(ValueError, match="`model` must be a torch.nn.Module"):
        orprune.save("model", path)
