"""A network's cost as a polynomial of degree <= 2 in the keep counts of its units.

:func:`orprune.network_costs` builds these from a traced model; the allocation MILP
(:mod:`orprune.budget`) takes them as budgets.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from orprune._validation import finite_scalar as _finite

__all__ = ["CostModel"]


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
