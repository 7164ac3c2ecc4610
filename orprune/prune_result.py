"""What :meth:`orprune.Pruner.prune` returns: the pruned model, its costs and a per-unit report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from orprune._phases import PhaseTime, format_phases
from orprune.budget.allocation import Allocation
from orprune.budget.recheck import PolishedPoint
from orprune.network.surgery import PruningPlan

__all__ = ["LatencyReport", "LatencyRound", "PruneResult", "RefitReport", "UnitReport"]


@dataclass(frozen=True)
class UnitReport:
    """What happened to one channel group."""

    unit: str
    channels_before: int
    channels_after: int
    solver: str
    relative_error: float  # summed over consumers, each relative to its ||Y||^2
    bound: float
    status: str
    solve_time: float  # the whole curve of this unit


@dataclass(frozen=True)
class LatencyRound:
    """One allocation of a measured-latency loop: the tables' budget, their prediction and the measurement,
    as fractions of the unpruned latency, and the allocation's summed error."""

    table_fraction: float
    predicted_fraction: float
    measured_fraction: float
    objective: float


@dataclass(frozen=True)
class LatencyReport:
    """Latency of the pruned model: predicted by the tables and measured (seconds per call).

    ``before`` and ``after`` are medians of calls alternating between the unpruned and the pruned model
    (the same machine state for both); ``predicted`` is the tables' sum at the chosen keep counts and
    ``table_full`` their sum at full width (the measured unpruned latency when the tables were made).
    ``rounds``: with a ``latency`` budget and ``latency_rounds``, every allocation tried on the way to a
    measured latency within the budget (the tables' budget moved after each measurement).
    """

    batch_size: int
    threads: int
    budget: float | None  # seconds; None when latency was not budgeted
    predicted: float
    table_full: float
    before: float
    after: float
    rounds: tuple[LatencyRound, ...] = ()

    @property
    def predicted_fraction(self) -> float:
        return self.predicted / self.table_full

    @property
    def measured_fraction(self) -> float:
        return self.after / self.before


@dataclass(frozen=True)
class RefitReport:
    """How the consumers reading pruned units were refitted (:func:`orprune._refit.refit_updates`).

    ``path``: ``"stream"``, the sequential refit in one node-by-node pass over all calibration batches
    (:mod:`orprune.network.streaming`); ``"passes"``, one pass of the calibration set per consumer (``reason`` says
    why not streamed: the model does not trace, a consumer runs twice, the memory limit, ...; the same updates);
    ``"parallel"``, ``sequential=False`` (the fit's statistics). Streamed only: ``peak_bytes``, the activations it
    held at most (measured); ``estimated_bytes``, what one pass of all batches holds (estimated from the first
    batch; above ``Pruner(refit_memory=...)`` batches are recomputed from checkpoints); ``passes``, its node
    evaluations in forward passes (1.0 without recomputation).
    """

    path: str
    consumers: int
    seconds: float
    reason: str | None = None
    peak_bytes: int | None = None
    estimated_bytes: int | None = None
    passes: float | None = None


@dataclass(frozen=True)
class PruneResult:
    """A pruned model with its costs and the per-unit report."""

    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    report: tuple[UnitReport, ...]
    allocation: Allocation
    plan: PruningPlan
    prune_time: float
    latency: LatencyReport | None = None  # with latency tables (Pruner.fit_latency or a `latency` budget)
    polished: tuple[PolishedPoint, ...] = ()  # swap-polished points of path curves (Pruner's `polish_time`)
    # fit's phases (trace, calibration, curves[, output errors]) then this prune's (allocation, polish, refit,
    # surgery[, latency]; repeated when the budget self-check re-solves): wall / CPU seconds, peak memory
    phases: tuple[PhaseTime, ...] = ()
    refit: RefitReport | None = None  # how the consumers were refitted (the last apply's)

    def summary(self) -> str:
        lines = [
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_after / self.macs_before:.3f}); "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.3f}); "
            f"allocation {self.allocation.status}, {self.prune_time:.1f} s",
            *([] if self.latency is None else [
                f"latency (batch {self.latency.batch_size}, {self.latency.threads} thread(s)): predicted "
                f"{self.latency.predicted_fraction:.3f}, measured {self.latency.measured_fraction:.3f} of the "
                f"unpruned ({1e3 * self.latency.before:.3g} -> {1e3 * self.latency.after:.3g} ms)"
                + (f", {len(self.latency.rounds)} measured round(s)" if self.latency.rounds else "")]),
            *([f"time: {format_phases(self.phases)}"] if self.phases else []),
            f"{'unit':<32} {'channels':>10} {'solver':>10} {'rel. error':>11} {'status':>10}",
        ]
        lines += [
            f"{r.unit:<32} {r.channels_before:>4} -> {r.channels_after:<3} {r.solver:>10} {r.relative_error:>11.4g} {r.status:>10}"
            for r in self.report
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "allocation_status": self.allocation.status,
            "allocation_gap": self.allocation.gap,
            "allocation_objective": self.allocation.objective,
            "prune_time": self.prune_time,
            "latency": None if self.latency is None else {
                **asdict(self.latency), "predicted_fraction": self.latency.predicted_fraction,
                "measured_fraction": self.latency.measured_fraction},
            "units": [asdict(r) for r in self.report],
            "polished": [asdict(p) for p in self.polished],
            "phases": [asdict(p) for p in self.phases],
            "refit": None if self.refit is None else asdict(self.refit),
        }
