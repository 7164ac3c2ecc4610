"""The data of the global allocation: cost models, the problem (options and error curves), the result.

:func:`orprune.allocate` solves an :class:`AllocationProblem` under :class:`CostModel` budgets and
returns an :class:`Allocation`; :func:`orprune.allocate_uniform` returns the same type.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from orprune._status import SOLUTION_PRESENT
from orprune._validation import finite_scalar as _finite
from orprune.network.cost_model import CostModel

__all__ = ["Allocation", "AllocationProblem", "CostModel"]  # CostModel: re-exported from the network stage


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """Candidate keep counts and error curves of every prunable unit.

    Parameters
    ----------
    options : mapping unit -> 1-D array of int
        Candidate keep counts, integers >= 0, strictly increasing. A single option fixes the unit.
    errors : mapping unit -> 1-D array of float
        ``errors[j][o]`` is the error of keeping ``options[j][o]`` channels (any finite values;
        monotonicity is not assumed).
    weights : mapping unit -> float, optional
        Non-negative weights of the units' errors; units left out weigh 1.
    ties : sequence of sequences of units, optional
        Groups of units that choose together: every unit of a group has the same number of options
        and all take the same option index ``o`` (option ``o`` of each is, e.g., the same keep
        fraction of its width). The stage rule of UCP (one width per stage of a basic-block ResNet,
        ``formulations/ucp.md``) is such a group per stage. Groups are disjoint; a unit in no group
        chooses alone.
    """

    options: Mapping[Hashable, np.ndarray]
    errors: Mapping[Hashable, np.ndarray]
    weights: Mapping[Hashable, float] | None = None
    ties: Sequence[Sequence[Hashable]] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping) or not isinstance(self.errors, Mapping):
            raise ValueError("`options` and `errors` must be mappings unit -> array.")
        if not self.options:
            raise ValueError("`options` must hold at least one unit.")
        if set(self.options) != set(self.errors):
            diff = set(self.options) ^ set(self.errors)
            raise ValueError(f"`options` and `errors` must have the same units; they differ on {diff!r}.")
        options, errors = {}, {}
        for u, raw in self.options.items():
            k = np.array(raw)  # copies: the arrays are frozen below
            if k.ndim != 1 or k.size == 0:
                raise ValueError(f"`options[{u!r}]` must be a non-empty 1-D array, got shape {k.shape}.")
            if not np.issubdtype(k.dtype, np.number) or np.issubdtype(k.dtype, np.complexfloating):
                raise ValueError(f"`options[{u!r}]` must hold integer keep counts.")
            if not np.all(np.isfinite(k)) or np.any(k != np.round(k)) or np.any(k < 0):
                raise ValueError(f"`options[{u!r}]` must hold integer keep counts >= 0, got {k}.")
            k = k.astype(np.int64)
            if np.any(np.diff(k) <= 0):
                raise ValueError(f"`options[{u!r}]` must be strictly increasing, got {k}.")
            e = np.array(self.errors[u], dtype=np.float64)
            if e.shape != k.shape:
                raise ValueError(
                    f"`errors[{u!r}]` must have one entry per option ({k.size}), got shape {e.shape}."
                )
            if not np.all(np.isfinite(e)):
                raise ValueError(f"`errors[{u!r}]` must be finite; it holds NaN or inf values.")
            k.flags.writeable = e.flags.writeable = False
            options[u], errors[u] = k, e
        weights = {u: 1.0 for u in options}
        if self.weights is not None:
            if not isinstance(self.weights, Mapping):
                raise ValueError("`weights` must be a mapping unit -> float or None.")
            unknown = set(self.weights) - set(options)
            if unknown:
                raise ValueError(f"`weights` names units without options: {sorted(map(repr, unknown))}.")
            for u, w in self.weights.items():
                w = _finite(w, f"weights[{u!r}]")
                if w < 0:
                    raise ValueError(f"`weights[{u!r}]` must be >= 0, got {w}.")
                weights[u] = w
        object.__setattr__(self, "options", MappingProxyType(options))
        object.__setattr__(self, "errors", MappingProxyType(errors))
        object.__setattr__(self, "weights", MappingProxyType(weights))
        object.__setattr__(self, "ties", _check_ties(self.ties, options))

    @property
    def units(self) -> tuple:
        return tuple(self.options)

    def tie_groups(self) -> list[list[int]]:
        """Every unit's group as indices into :attr:`units`: the tied groups, then each other unit alone."""
        index = {u: j for j, u in enumerate(self.units)}
        groups = [[index[u] for u in group] for group in self.ties]
        tied = {j for group in groups for j in group}
        return groups + [[j] for j in range(len(index)) if j not in tied]

    def objective(self, keep: Mapping[Hashable, int]) -> float:
        """Weighted error of ``keep``; every count must be one of the unit's options."""
        total = []
        for u in self.units:
            hit = np.flatnonzero(self.options[u] == keep[u])
            if hit.size != 1:
                raise ValueError(f"`keep[{u!r}]` = {keep[u]} is not one of the options of unit {u!r}.")
            total.append(self.weights[u] * self.errors[u][hit[0]])
        return math.fsum(total)


def _check_ties(ties: Any, options: Mapping[Hashable, np.ndarray]) -> tuple[tuple[Hashable, ...], ...]:
    if isinstance(ties, (str, bytes)) or not isinstance(ties, Sequence):
        raise ValueError(f"`ties` must be a sequence of groups (sequences of units), got {type(ties).__name__}.")
    seen: set = set()
    out = []
    for group in ties:
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise ValueError(f"`ties` must hold sequences of units, got {group!r}.")
        group = tuple(group)
        unknown = [u for u in group if u not in options]
        if unknown:
            raise ValueError(f"`ties` names units without options: {sorted(map(repr, unknown))}.")
        twice = [u for u in group if u in seen] + [u for i, u in enumerate(group) if u in group[:i]]
        if twice:
            raise ValueError(f"`ties` groups must be disjoint; {sorted(set(map(repr, twice)))} appear twice.")
        seen.update(group)
        sizes = {u: options[u].size for u in group}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the units of a `ties` group must have the same number of options, got {sizes}.")
        if len(group) > 1:  # a group of one ties nothing
            out.append(group)
    return tuple(out)


@dataclass(frozen=True)
class Allocation:
    """The chosen keep count of every unit and the solver's certificate.

    Attributes
    ----------
    keep : mapping unit -> int
    objective : float
        Weighted error of ``keep``, recomputed from the error curves.
    bound : float
        Proven lower bound on the optimal objective (HiGHS's dual bound, or every unit's least
        error if that is larger, as when HiGHS stops before its root LP).
    gap : float
        ``(objective - bound) / objective``.
    status : str
        ``"optimal"`` (within ``mip_rel_gap``) or ``"time_limit"``.
    costs : mapping name -> float
        Every cost model evaluated exactly at ``keep``.
    solve_time : float
        Wall time in seconds (model building and solving).
    message : str
        Detail, including HiGHS's own status text.
    formulation : str
        Linearisation used.
    info : mapping
        HiGHS counters: ``nodes``, ``lp_iterations``, ``columns``, ``rows``, ``highs_time``.
    """

    keep: Mapping[Hashable, int]
    objective: float
    bound: float
    gap: float
    status: str
    costs: Mapping[str, float]
    solve_time: float
    message: str
    formulation: str
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.status in SOLUTION_PRESENT
