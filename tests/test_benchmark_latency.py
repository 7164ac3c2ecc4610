"""Latency helpers of the network-pruning benchmark: alternating fastest calls, the optimised deployment mode."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from benchmarks.network_pruning import fastest_call_times, optimised_for_inference, torch_threads


class Block(nn.Module):
    """conv-BN-ReLU twice with a residual add: what the optimised mode folds and fuses."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.head(y.mean((2, 3)))


class BatchDependent(Block):
    """Takes another path for large batches: a trace on a small example records the wrong one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * 2 if x.shape[0] > 4 else out


def trained_block(cls: type[Block] = Block) -> Block:
    torch.manual_seed(0)
    model = cls()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics, so folding BatchNorm changes the weights
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_optimised_matches_eager_and_folds_batchnorm():
    model = trained_block()
    x = torch.randn(16, 1, 12, 12)
    optimised = optimised_for_inference(model, x[:2], x)
    with torch.no_grad():
        torch.testing.assert_close(optimised(x), model(x), rtol=1e-4, atol=1e-5)
    assert "batch_norm" not in str(optimised.graph)
    assert isinstance(optimised, torch.jit.ScriptModule)


def test_optimised_refuses_a_trace_that_does_not_represent_the_model():
    model = trained_block(BatchDependent)
    x = torch.randn(16, 1, 12, 12)
    with pytest.raises(RuntimeError, match="differs from eager"), pytest.warns(torch.jit.TracerWarning):
        optimised_for_inference(model, x[:2], x)


def test_calls_alternate_after_warmup():
    calls = []
    models = [lambda x, i=i: calls.append(i) for i in range(3)]
    times = fastest_call_times(models, torch.zeros(1), repeats=4, warmup=2)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert calls == [0, 0, 1, 1, 2, 2] + [0, 1, 2] * 4


def test_fastest_call_counts_on_the_thread_clock(monkeypatch):
    # A scripted clock: each call of model i lasts durations[i][repeat]; the result is each model's minimum.
    durations = [[3.0, 1.0, 2.0], [5.0, 6.0, 4.0]]
    now = [0.0]
    monkeypatch.setattr(time, "thread_time", lambda: now[0])
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("one torch thread must use the thread clock"))
    counter = {0: iter(durations[0]), 1: iter(durations[1])}

    def model(i):
        def call(x):
            now[0] += next(counter[i])
        return call

    with torch_threads(1):
        assert fastest_call_times([model(0), model(1)], torch.zeros(1), repeats=3, warmup=0) == [1.0, 4.0]


def test_one_thread_runs_the_work_on_the_calling_thread():
    # Process CPU time counts every thread of this process; the calling thread's must be nearly all of it,
    # whatever other processes do (neither clock counts time spent descheduled).
    conv = nn.Conv2d(16, 16, 3, padding=1).eval()
    x = torch.randn(64, 16, 28, 28)
    with torch_threads(1), torch.no_grad():
        conv(x)
        thread, process = time.thread_time(), time.process_time()
        while time.process_time() - process < 0.2:  # enough work to measure, however fast the machine
            conv(x)
        thread, process = time.thread_time() - thread, time.process_time() - process
    assert thread >= 0.9 * process


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bad_repeats():
    with pytest.raises(ValueError, match="`repeats` must be at least 1"):
        fastest_call_times([lambda x: x], torch.zeros(1), repeats=0)
