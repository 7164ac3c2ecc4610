"""Latency tables: which modules, at which widths, the cache keys, and the tables against the pruned model.

The timer is mocked (a deterministic function of the module and its input shape) so the tests are exact.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from orprune.network.graph import find_groups
from orprune.network.latency import latency_tables
from orprune.network.surgery import PruningPlan, apply_pruning
from orprune.network.timing import call_times


class Net(nn.Module):
    """stem conv (unit a) -> conv (unit b) -> BN -> ReLU -> conv (unit c) -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(self.relu(self.bn(self.b(F.relu(self.a(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def fake_timer(calls: list | None = None):
    """Seconds = a function of the module type, its widths and its input shape, never of the wall clock."""
    def timer(module: nn.Module, x: torch.Tensor) -> float:
        if calls is not None:
            calls.append((type(module).__name__, repr(module), tuple(x.shape)))
        if isinstance(module, nn.Conv2d):
            return 1e-3 * module.in_channels * module.out_channels * x.shape[0] + 1e-4 * (module.out_channels % 4)
        if isinstance(module, nn.Linear):
            return 1e-4 * module.in_features * module.out_features * x.shape[0]
        if isinstance(module, nn.BatchNorm2d):
            return 2e-5 * module.num_features * x.shape[0]
        if isinstance(module, nn.ReLU):
            return 1e-5 * x.shape[1] * x.shape[0]
        return 0.5  # the whole model
    return timer


def modules_time(model: nn.Module, batch: int) -> float:
    """What the fake timer charges the modules of ``model``, from their actual widths."""
    t = fake_timer()
    total = 0.0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += t(m, torch.zeros(batch, m.in_channels, 1, 1))
        elif isinstance(m, nn.Linear):
            total += t(m, torch.zeros(batch, m.in_features))
        elif isinstance(m, nn.BatchNorm2d):
            total += t(m, torch.zeros(batch, m.num_features))
        elif isinstance(m, nn.ReLU):
            total += t(m, torch.zeros(batch, model.bn.num_features))
    return total


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 2, 6, 6)
    graph = find_groups(model, x[:1])
    options = {u.name: np.array([1, 3, u.n_channels]) for u in graph.units}
    return model, graph, x, options


def test_tables_predict_the_pruned_models_modules_exactly(setup, tmp_path):
    model, graph, x, options = setup
    assert set(graph.names) == {"a", "b", "c"}
    lat = latency_tables(model, graph, x, options, cache_dir=tmp_path, timer=fake_timer(), progress=False)
    assert set(lat.modules) == {"a", "b", "bn", "relu", "c", "fc"}
    assert set(lat.cost.pairwise) == {("a", "b"), ("b", "c")}  # conv b reads a, conv c reads b
    full_modules = modules_time(model, 4)
    assert lat.tabulated == pytest.approx(full_modules)
    assert lat.full == 0.5
    scale = lat.full / lat.tabulated
    for combo in itertools.product(*(options[u] for u in graph.names)):
        keep = dict(zip(graph.names, map(int, combo)))
        plan = PruningPlan({u: np.arange(k) for u, k in keep.items()}, {})
        pruned = apply_pruning(model, graph, plan, x[:1])
        assert lat.predict(keep) == pytest.approx(scale * modules_time(pruned, 4), rel=1e-12)
    full = {u.name: u.n_channels for u in graph.units}
    assert lat.predict(full) == pytest.approx(lat.full)


def test_cells_are_timed_once_at_the_users_batch(setup, tmp_path):
    model, graph, x, options = setup
    calls = []
    latency_tables(model, graph, x, options, cache_dir=tmp_path, timer=fake_timer(calls), progress=False)
    cells = [c for c in calls if c[0] != "_Whole"]
    assert len(cells) == len(set(cells))
    assert all(shape[0] == 4 for _, _, shape in calls)
    # conv b: 3 x 3 pairs of (a, b) widths; conv c: 3 x 3; stem a and the BN/ReLU/Linear: 3 each
    assert sum(name == "Conv2d" for name, _, _ in cells) == 3 + 9 + 9


def test_cache_reused_and_keyed_by_batch_and_threads(setup, tmp_path):
    model, graph, x, options = setup
    timer = fake_timer()
    first = latency_tables(model, graph, x, options, cache_dir=tmp_path, timer=timer, progress=False)
    n_cells = first.measured
    assert n_cells > 0 and first.cached == 0
    again = latency_tables(model, graph, x, options, cache_dir=tmp_path, timer=timer, progress=False)
    assert again.measured == 0 and again.cached == n_cells
    assert again.predict({"a": 3, "b": 1, "c": 4}) == first.predict({"a": 3, "b": 1, "c": 4})
    other_batch = latency_tables(model, graph, x[:2], options, cache_dir=tmp_path, timer=timer, progress=False)
    assert other_batch.measured == n_cells and other_batch.batch_size == 2
    other_threads = latency_tables(model, graph, x, options, threads=2, cache_dir=tmp_path, timer=timer,
                                   progress=False)
    assert other_threads.measured == n_cells
    files = sorted(tmp_path.glob("latency-*.json"))
    assert len(files) == 3
    contexts = [json.loads(f.read_text())["context"] for f in files]
    assert {(c["batch_size"], c["threads"]) for c in contexts} == {(4, 1), (2, 1), (4, 2)}
    assert all(c["torch"] == torch.__version__ and c["device"].startswith("cpu") for c in contexts)
    # no cache: always measured
    none = latency_tables(model, graph, x, options, cache_dir=False, timer=timer, progress=False)
    assert none.measured == n_cells and none.cache_file is None


def test_new_options_measure_only_the_new_cells(setup, tmp_path):
    model, graph, x, options = setup
    timer = fake_timer()
    latency_tables(model, graph, x, options, cache_dir=tmp_path, timer=timer, progress=False)
    wider = dict(options, c=np.array([1, 2, 3, 4]))
    lat = latency_tables(model, graph, x, wider, cache_dir=tmp_path, timer=timer, progress=False)
    # c = 2 is new: conv c at 3 widths of b, the fc at c = 2 (BN/ReLU/conv b do not depend on c)
    assert lat.measured == 3 + 1


def test_bad_inputs(setup, tmp_path):
    model, graph, x, options = setup
    with pytest.raises(ValueError, match="`options` lacks the units"):
        latency_tables(model, graph, x, {"a": options["a"]}, cache_dir=False, timer=fake_timer())
    with pytest.raises(ValueError, match="`threads` must be a positive integer"):
        latency_tables(model, graph, x, options, threads=0, cache_dir=False, timer=fake_timer())
    with pytest.raises(ValueError, match="`graph` must be a PruningGraph"):
        latency_tables(model, None, x, options, cache_dir=False, timer=fake_timer())


def test_real_timer_runs_and_sums_to_the_measured_latency(setup):
    model, graph, x, options = setup
    lat = latency_tables(model, graph, x, options, cache_dir=False, repeats=1, progress=False)
    full = {u.name: u.n_channels for u in graph.units}
    assert lat.full > 0 and lat.tabulated > 0
    assert lat.predict(full) == pytest.approx(lat.full)
    assert math.isfinite(lat.predict({"a": 1, "b": 1, "c": 1}))


def test_call_times_statistics():
    calls = []
    models = [lambda x, i=i: calls.append(i) for i in range(2)]
    assert len(call_times(models, None, repeats=3, warmup=1, statistic="median")) == 2
    assert calls == [0, 1] + [0, 1] * 3
    with pytest.raises(ValueError, match="`statistic` must be"):
        call_times(models, None, repeats=1, statistic="mean")
