"""Timing torch modules on a shared CPU: interleaved calls, the thread's CPU clock, a torch thread count."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["call_times", "fastest_time", "torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _clock() -> Callable[[], float]:
    """``time.thread_time`` with one torch thread (the work runs on the calling thread, and CPU time does not
    count the time another process holds the core), ``time.perf_counter`` with more (workers' time)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


@torch.no_grad()
def call_times(models: Sequence[Callable[[Any], Any]], x: Any, repeats: int, warmup: int = 3,
               statistic: str = "min") -> list[float]:
    """Seconds per call of each model on ``x``: the fastest (``"min"``) or median of ``repeats`` calls.

    Calls alternate between the models (a, b, a, b, ...), so that every model meets the same machine state
    (clock speed, caches, other processes) and their ratios compare like with like; ``warmup`` untimed calls
    of each come first. The clock is the thread's CPU time with one torch thread, wall time otherwise.
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1, got {repeats}.")
    if statistic not in ("min", "median"):
        raise ValueError(f"`statistic` must be 'min' or 'median', got {statistic!r}.")
    clock = _clock()
    for model in models:
        for _ in range(warmup):
            model(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, model in enumerate(models):
            start = clock()
            model(x)
            times[i].append(clock() - start)
    return [min(t) if statistic == "min" else statistics.median(t) for t in times]


def fastest_time(module: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``module`` on ``x`` (the default timer of the tables).

    The fastest call is the one least disturbed by the rest of a shared machine: disturbances only add.
    """
    return call_times([module], x, repeats, warmup, statistic="min")[0]
