"""A network's cost as a function of the keep counts of its units: a polynomial or a table.

:func:`orprune.network_costs` builds :class:`CostModel` polynomials (MACs, params) from a traced model,
:func:`orprune.network.latency.latency_tables` a :class:`TableCost` of measured latencies; the allocation
MILP (:mod:`orprune.budget`) takes either as a budget.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from orprune._validation import finite_scalar as _finite

__all__ = ["CostModel", "TableCost"]


@dataclass(frozen=True, eq=False)
class CostModel:
    r"""A cost of degree <= 2 in the keep counts.

    .. math:: \mathrm{cost}(k) = c_0 + \sum_j a_j k_j + \sum_{(i,j)} b_{ij} k_i k_j

    A key ``(j, j)`` in ``bilinear`` is the square :math:`k_j^2`; ``(i, j)`` and ``(j, i)`` add up.

    Parameters
    ----------
    constant : float
        :math:`c_0` (fixed layers, fixed units folded in).
    linear : mapping unit -> float
        :math:`a_j` (BatchNorm params, depthwise convs, a conv whose input is fixed).
    bilinear : mapping (unit_i, unit_j) -> float
        :math:`b_{ij}` (a conv's MACs: producer's kept channels times its own).
    """

    constant: float = 0.0
    linear: Mapping[Hashable, float] = field(default_factory=dict)
    bilinear: Mapping[tuple[Hashable, Hashable], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.linear, Mapping) or not isinstance(self.bilinear, Mapping):
            raise ValueError("`linear` and `bilinear` must be mappings.")
        linear = {u: _finite(a, f"linear[{u!r}]") for u, a in self.linear.items()}
        bilinear: dict[tuple[Hashable, Hashable], float] = {}
        for key, b in self.bilinear.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"`bilinear` keys must be pairs (unit_i, unit_j), got {key!r}.")
            bilinear[key] = _finite(b, f"bilinear[{key!r}]")
        object.__setattr__(self, "constant", _finite(self.constant, "constant"))
        object.__setattr__(self, "linear", MappingProxyType(linear))
        object.__setattr__(self, "bilinear", MappingProxyType(bilinear))

    @property
    def units(self) -> frozenset:
        """Every unit the cost depends on."""
        return frozenset(self.linear) | frozenset(u for key in self.bilinear for u in key)

    @property
    def nonnegative(self) -> bool:
        """All coefficients >= 0: with keep counts >= 0 the cost never falls when a count grows."""
        return all(a >= 0 for a in self.linear.values()) and all(b >= 0 for b in self.bilinear.values())

    def evaluate(self, keep: Mapping[Hashable, float]) -> float:
        """The cost of ``keep`` (unit -> keep count), summed with :func:`math.fsum`."""
        missing = [u for u in self.units if u not in keep]
        if missing:
            raise ValueError(f"`keep` lacks a keep count for unit(s) {sorted(map(repr, missing))}.")
        terms = [self.constant]
        terms += [a * keep[u] for u, a in self.linear.items()]
        terms += [b * keep[u] * keep[v] for (u, v), b in self.bilinear.items()]
        return math.fsum(terms)


def _table(raw: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    t = np.array(raw, dtype=np.float64)  # a copy, frozen below
    if t.shape != shape:
        raise ValueError(f"`{name}` must have shape {shape} (one entry per option), got {t.shape}.")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"`{name}` must be finite; it holds NaN or inf values.")
    t.flags.writeable = False
    return t


@dataclass(frozen=True, eq=False)
class TableCost:
    r"""A cost tabulated over the keep options: one table per unit and per pair of units.

    .. math:: \mathrm{cost}(k) = c_0 + \sum_j t_j[k_j] + \sum_{(i,j)} T_{ij}[k_i, k_j]

    A measured latency is of this form (``formulations/latency_tables.md``): a conv's time depends on
    its input and its output width, each the keep count of at most one unit. Nothing is assumed about
    the tables (latency need not grow with the width).

    Parameters
    ----------
    options : mapping unit -> 1-D array of int
        The keep counts each table is indexed by (strictly increasing).
    constant : float
        :math:`c_0`.
    unary : mapping unit -> 1-D array
        ``unary[j][o]``: the cost at ``options[j][o]``.
    pairwise : mapping (unit_i, unit_j) -> 2-D array
        ``pairwise[(i, j)][o, p]``: the cost at ``options[i][o]``, ``options[j][p]`` (i != j).
    """

    options: Mapping[Hashable, np.ndarray]
    constant: float = 0.0
    unary: Mapping[Hashable, np.ndarray] = field(default_factory=dict)
    pairwise: Mapping[tuple[Hashable, Hashable], np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not all(isinstance(m, Mapping) for m in (self.options, self.unary, self.pairwise)):
            raise ValueError("`options`, `unary` and `pairwise` must be mappings.")
        options = {}
        for u, raw in self.options.items():
            k = np.array(raw)
            if k.ndim != 1 or k.size == 0 or np.any(k != np.round(k)) or np.any(np.diff(k) <= 0):
                raise ValueError(f"`options[{u!r}]` must be a non-empty strictly increasing 1-D array of integers.")
            k = k.astype(np.int64)
            k.flags.writeable = False
            options[u] = k
        unary, pairwise = {}, {}
        for u, raw in self.unary.items():
            if u not in options:
                raise ValueError(f"`unary[{u!r}]` names a unit without `options`.")
            unary[u] = _table(raw, (options[u].size,), f"unary[{u!r}]")
        for key, raw in self.pairwise.items():
            if not (isinstance(key, tuple) and len(key) == 2) or key[0] == key[1]:
                raise ValueError(f"`pairwise` keys must be pairs of two units, got {key!r}.")
            if not all(u in options for u in key):
                raise ValueError(f"`pairwise[{key!r}]` names a unit without `options`.")
            pairwise[key] = _table(raw, (options[key[0]].size, options[key[1]].size), f"pairwise[{key!r}]")
        object.__setattr__(self, "constant", _finite(self.constant, "constant"))
        object.__setattr__(self, "options", MappingProxyType(options))
        object.__setattr__(self, "unary", MappingProxyType(unary))
        object.__setattr__(self, "pairwise", MappingProxyType(pairwise))

    @property
    def units(self) -> frozenset:
        """Every unit the cost depends on."""
        return frozenset(self.unary) | frozenset(u for key in self.pairwise for u in key)

    @property
    def nonnegative(self) -> bool:
        """Always False: a table need not grow with the keep counts (the allocation presolves accordingly)."""
        return False

    def index(self, unit: Hashable, count: int) -> int:
        """Position of ``count`` among the options of ``unit``."""
        hit = np.flatnonzero(self.options[unit] == count)
        if hit.size != 1:
            raise ValueError(f"`keep[{unit!r}]` = {count} is not one of the tabulated options of unit {unit!r}.")
        return int(hit[0])

    def evaluate(self, keep: Mapping[Hashable, float]) -> float:
        """The cost of ``keep`` (unit -> keep count, each one of the unit's options), with :func:`math.fsum`."""
        missing = [u for u in self.units if u not in keep]
        if missing:
            raise ValueError(f"`keep` lacks a keep count for unit(s) {sorted(map(repr, missing))}.")
        terms = [self.constant] + [float(t[self.index(u, keep[u])]) for u, t in self.unary.items()]
        terms += [float(t[self.index(u, keep[u]), self.index(v, keep[v])]) for (u, v), t in self.pairwise.items()]
        return math.fsum(terms)
