"""``benchmarks/shufflenet_stages.py`` on a tiny configuration: the stage rows, the pruning line, a bad argument."""

from __future__ import annotations

import re

import pytest

from benchmarks import shufflenet_stages
from tests.models import one_thread  # noqa: F401  (module fixture)


def test_a_tiny_configuration_reports_every_stage_and_prunes_like_the_masked_model():
    lines = shufflenet_stages.run_config("tiny", (16, 32), (3, 2), size=16, images=8, macs=0.6, solver="greedy")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| stage")]
    # 8 channels per branch and 3 blocks: one count (kept whole); 16 and 2 blocks: 4 counts
    assert rows == ["| 1 | 4, 2, 1, 1 | 1 |", "| 2 | 8, 4, 4 | 4 |"]
    summary = next(line for line in lines if line.startswith("`Pruner"))
    macs = float(re.search(r"MACs (\d\.\d+)", summary).group(1))
    diff = float(re.search(r"pruned vs masked ([0-9.e+-]+);", summary).group(1))
    assert macs <= 0.6 and diff < 1e-4


def test_an_unknown_configuration_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        shufflenet_stages.main(["--configs", "x3.0"])
    assert "unknown ['x3.0']" in capsys.readouterr().err
