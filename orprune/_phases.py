"""Where a prune run spends its time and memory: wall and CPU seconds and the memory high-water mark per phase.

``PhaseTime`` records land in :class:`orprune.PruneResult` (``phases``), so a user who waits minutes on a big
network sees which step to tune (``positions_per_image`` for calibration, ``solver`` or ``max_options`` for
the curves, ``polish_time``, ``sequential`` for the refit) without a profiler.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["PhaseTime", "format_phases", "module_device", "peak_memory_mb", "timed_phase"]


@dataclass(frozen=True)
class PhaseTime:
    """One phase of :meth:`Pruner.fit` / :meth:`Pruner.prune`.

    ``cpu`` is this process's CPU time over all threads (above ``wall`` when torch / BLAS run in parallel; the
    curves' worker processes, with ``n_jobs``, are not counted);
    ``peak_memory_mb`` is the process's resident-memory high-water mark at the end of the phase (it never
    decreases: a phase that raises it is the one that needed the memory), ``None`` where the platform does
    not report it; ``device_peak_mb`` the CUDA allocator's peak during the phase when the model is on a GPU.
    """

    name: str
    wall: float
    cpu: float
    peak_memory_mb: float | None
    device_peak_mb: float | None = None


def peak_memory_mb() -> float | None:
    """The process's peak resident memory in MB (``getrusage``; None on platforms without it)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter (None without parameters)."""
    return next((p.device for p in module.parameters()), None)


@contextlib.contextmanager
def timed_phase(record: list[PhaseTime], name: str, device: torch.device | None = None) -> Iterator[None]:
    """Append the ``PhaseTime`` of the ``with`` body to ``record`` (also when the body raises).

    Phases recorded inside the body (nested ``timed_phase`` on the same ``record``) are not counted twice:
    their time is taken out of this one's, so a record's walls add up to the time spent.
    """
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu, first = time.perf_counter(), time.process_time(), len(record)
    try:
        yield
    finally:
        inner = record[first:]
        wall = time.perf_counter() - wall - sum(p.wall for p in inner)
        cpu = time.process_time() - cpu - sum(p.cpu for p in inner)
        record.append(PhaseTime(name=name, wall=wall, cpu=cpu,
                                peak_memory_mb=peak_memory_mb(),
                                device_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None))


def format_phases(phases: tuple[PhaseTime, ...] | list[PhaseTime]) -> str:
    """One line: each phase's wall seconds (phases of one name summed, e.g. a refit run per self-check round),
    then the peak memory: ``"calibration 34.0 s, curves 134.2 s, ...; peak memory 5401 MB"``."""
    if not phases:
        return ""
    walls: dict[str, float] = {}
    for p in phases:
        walls[p.name] = walls.get(p.name, 0.0) + p.wall
    text = ", ".join(f"{name} {wall:.1f} s" for name, wall in walls.items())
    peaks = [p.peak_memory_mb for p in phases if p.peak_memory_mb is not None]
    return text + (f"; peak memory {max(peaks):.0f} MB" if peaks else "")
