"""The result of selecting channels in one layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from orprune._status import SOLUTION_PRESENT

__all__ = ["Selection", "SolverResult", "relative_gap"]


def relative_gap(objective: float, bound: float, scale: float) -> float:
    """``(objective - bound) / objective``, 0 when both vanish at the problem's ``scale``."""
    floor = 1e-12 * max(scale, 1.0)
    return max(objective - bound, 0.0) / max(abs(objective), floor)


class SolverResult:
    """What the frozen result dataclasses of the layer solvers share: their array fields are made read-only
    after construction, and ``success`` reads their ``status``."""

    status: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    @property
    def success(self) -> bool:
        """Whether a solution is present (optimal, heuristic, or stopped at the time limit)."""
        return self.status in SOLUTION_PRESENT


@dataclass(frozen=True)
class Selection(SolverResult):
    """Channels kept in one layer, their refit weights and the certificate the solver gives.

    Attributes
    ----------
    mask : ndarray of bool, shape (C,)
        Kept channels.
    weights : ndarray, shape (C*g, n_out)
        Least-squares weights of the kept channels; rows of dropped channels are zero.
    objective : float
        Reconstruction error of ``mask`` (equals ``prob.objective(mask)``).
    bound : float
        A proven lower bound on the optimum over all masks with the same number of channels.
        Exact solvers report their dual bound; heuristics report ``f(all channels)``, which is
        valid because the error never increases when a channel is added.
    gap : float
        ``(objective - bound) / objective``.
    status : str
        One of :mod:`orprune._status`: ``"optimal"``, ``"feasible"``, ``"time_limit"``.
    solver : str
        Registry name of the solver.
    solve_time : float
        Wall time in seconds.
    message : str
        Human-readable detail, including backend messages.
    info : mapping
        Solver-specific counters (iterations, cuts, nodes, ...).
    """

    mask: np.ndarray
    weights: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    solver: str
    solve_time: float
    message: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> np.ndarray:
        """Indices of the kept channels."""
        return np.flatnonzero(self.mask)

    @property
    def k(self) -> int:
        return int(self.mask.sum())
