"""Bad inputs fail before any work; Ctrl-C stops a process pool at once and leaves no process behind."""

import inspect
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import orprune

ROOT = Path(__file__).resolve().parents[1]


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3)).eval()


@pytest.fixture
def no_fit(monkeypatch):
    """Any statistics or curves would fail the test: the check must come first."""
    def fail(*_args, **_kwargs):
        pytest.fail("work started before the inputs were checked")
    monkeypatch.setattr(orprune.pipeline, "collect_statistics", fail)
    monkeypatch.setattr(orprune.pipeline, "find_groups", fail)


@pytest.mark.parametrize("budget", [1.5, 0, -1, math.nan, math.inf, "0.5", True])
def test_prune_checks_the_budget_before_fitting(no_fit, budget):
    with pytest.raises(ValueError, match="`macs` must be a fraction"):
        orprune.prune(tiny(), [torch.randn(4, 1, 8, 8)], macs=budget)


def test_prune_needs_a_budget_before_fitting(no_fit):
    with pytest.raises(ValueError, match="give a budget"):
        orprune.prune(tiny(), [torch.randn(4, 1, 8, 8)])


@pytest.mark.parametrize("options, match", [
    ({"solver": "foo"}, "`solver` must be one of"),
    ({"time_limit": -1}, "`time_limit` must be a positive"),
    ({"positions_per_image": 0}, "`positions_per_image` must be a positive"),
    ({"n_jobs": 0}, "`n_jobs` must be a positive"),
])
def test_bad_options_fail_before_work(no_fit, options, match):
    with pytest.raises(ValueError, match=match):
        orprune.Pruner(progress=False, **options).fit(tiny(), [torch.randn(4, 1, 8, 8)])


@pytest.mark.parametrize("calibration, match", [
    (torch.randn(4, 1, 8, 8), "must be an iterable of batches"),
    ([], "is empty"),
    ([torch.randn(4, 3, 8, 8)], r"does not run on the `calibration` inputs \(one input of shape \(1, 3, 8, 8\)\)"),
    ([torch.randn(4, 1, 8, 8), torch.randn(4, 1, 9, 8)], r"batch 1 has inputs of shape \(4, 1, 9, 8\)"),
    ([torch.full((4, 1, 8, 8), math.nan)], "NaN or inf"),
])
def test_calibration_that_does_not_fit_the_model_fails_first(no_fit, calibration, match):
    with pytest.raises(ValueError, match=match):
        orprune.Pruner(progress=False).fit(tiny(), calibration)


def test_the_docstring_documents_every_option_in_order():
    """The concise Pruner docstring stays complete: its Parameters section names each constructor argument once,
    in the signature's order, each with a description."""
    section = orprune.Pruner.__doc__.split("Parameters\n    ----------\n")[1].split("\n\n")[0]
    entries = re.findall(r"^    (\w+) : [^\n]+\n((?:        [^\n]+\n?)*)", section, re.M)
    assert [name for name, _ in entries] == list(inspect.signature(orprune.Pruner).parameters)
    assert all(text.strip() for _, text in entries), [name for name, text in entries if not text.strip()]


def test_prune_after_fit_checks_budget_and_time_limit():
    pruner = orprune.Pruner(solver="greedy", progress=False).fit(tiny(), [torch.randn(8, 1, 8, 8)])
    for bad in (0, 1.5, math.nan):
        with pytest.raises(ValueError, match="`params` must be a fraction"):
            pruner.prune(params=bad)
    with pytest.raises(ValueError, match="`time_limit` must be"):
        pruner.prune(macs=0.5, time_limit=0)
    with pytest.raises(ValueError, match="`allocation` must be"):
        pruner.prune(macs=0.5, allocation="greedy")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from ``ps``)."""
    rows = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,stat="], capture_output=True, text=True).stdout.splitlines()
    table = [row.split() for row in rows if row.strip()]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {int(p) for p, pp, stat in table if int(pp) in frontier and not stat.startswith("Z")} - found
        found |= frontier
    return found


def interrupt_group(proc: subprocess.Popen, ready: Callable[[], None], settle: float) -> tuple[set[int], str, float]:
    """Ctrl-C as a terminal sends it: once ``ready()`` returns and ``settle`` seconds pass, SIGINT to the whole
    process group of ``proc`` (started with ``start_new_session=True``). Returns the processes below ``proc``
    just before, its stderr, and the seconds it took to exit; the group is killed if anything fails."""
    try:
        ready()
        time.sleep(settle)
        children = descendants(proc.pid)
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        return children, err, time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                out.add(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


POOLED_FIT = textwrap.dedent("""
    import contextlib, sys, torch
    import orprune, orprune.pipeline as pipeline
    from orprune.examples.zoo import resnet20

    real = pipeline.interruptible_pool

    @contextlib.contextmanager
    def announced(*args, **kwargs):
        with real(*args, **kwargs) as mapper:
            print("pool up", flush=True)
            yield mapper

    if __name__ == "__main__":
        torch.set_num_threads(1)
        pipeline.interruptible_pool = announced
        torch.manual_seed(0)
        x = torch.randn(32, 1, 8, 8)
        # exact solves of 5 s each: many minutes of curves, interrupted within the first
        orprune.Pruner(solver="exact", time_limit=5, progress=False, n_jobs=2).fit(resnet20(in_channels=1).eval(), [x])
        print("finished", flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups and SIGINT")
def test_ctrl_c_stops_a_process_pool_within_seconds(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(POOLED_FIT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a terminal's Ctrl-C sends SIGINT to the whole foreground process group: the workers too
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    def ready():
        assert proc.stdout.readline().strip() == "pool up"

    children, err, took = interrupt_group(proc, ready, settle=3.0)  # the workers are up and solving
    assert len(children) >= 2
    assert took < 3.0, err
    assert proc.returncode == -signal.SIGINT, err  # KeyboardInterrupt reached the top of the script
    assert "InvalidStateError" not in err and err.count("KeyboardInterrupt") == 1, err
    time.sleep(0.5)
    assert not alive(children)
