"""A ShuffleNetV2 stage split into units by where its channels go, their keep counts tied by the chunks' balance.

On a path with a channel shuffle, a chunk's exact condition is that every part keeps as many channels
(``formulations/split_and_shuffle.md`` section 2); tying positions instead (as for a chunk alone) chains a stage's
channels into ``h / 2^s`` coarse decisions, or into one when the branch width ``h`` is not a multiple of ``2^s``.
Here the shuffles and residual adds still tie (they must), which leaves one class per root channel; the classes are
grouped by *signature*, how many channels each tensor and consumer on the path holds of them (the classes that
leave the stage at block ``t``'s branch, those that reach the next stage, a class straddling a chunk's halves), so
each group is a unit with one cost per decision and its own consumers. Each chunk gives one linear equation on
the groups' keep counts (``sum_g (count_g(part j) - count_g(part 0)) k_g = 0``). :func:`count_chains` turns those
equations into a chain of keep-count vectors, which the allocation takes as tied options
(``AllocationProblem.ties``): section 4 of the formulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from orprune.network.label_maps import LabelTrace, NotFollowed
from orprune.network.tied_units import build_unit, class_lookup
from orprune.network.units import PrunableUnit

__all__ = ["balanced_units", "count_chains"]


def balanced_units(trace: LabelTrace) -> tuple[list[tuple[PrunableUnit, dict[Any, float]]], list[dict[str, int]]]:
    """The units of a traced stage (one per signature group, named ``root:g`` when there are several) with their
    cost-model multiplicities, and the chunks' equations on their keep counts (unit -> coefficient)."""
    ties, n_root = trace.ties, len(trace.root_labels)
    root_classes = ties.classes(trace.root_labels).tolist()
    if len(set(root_classes)) != n_root:
        raise NotFollowed("a residual add or shuffle ties two of the root's channels together")
    channel_of = {c: r for r, c in enumerate(root_classes)}  # each class holds one root channel
    looked_up: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(map) -> (map, its root channels): once per map

    def root_channel(m: np.ndarray, where: str) -> np.ndarray:
        if id(m) not in looked_up:  # the map is kept with its result, so its id is not reused meanwhile
            looked_up[id(m)] = (m, class_lookup(ties, channel_of, m, where))
        return looked_up[id(m)][1]

    tensors = {key: root_channel(m, "a tensor") for key, m in trace.maps.items() if m is not None}
    readers = {key: root_channel(m, "a consumer") for key, m in trace.inputs.items()}
    columns = list(tensors.values()) + list(readers.values())
    signature = np.stack([np.bincount(r[r >= 0], minlength=n_root) for r in columns], axis=1)
    _, group = np.unique(signature, axis=0, return_inverse=True)
    order = list(dict.fromkeys(group.ravel().tolist()))  # groups in order of their first root channel
    group = np.array([order.index(g) for g in group.ravel()])
    root_name = trace.names[trace.root]
    names = [root_name if len(order) == 1 else f"{root_name}:{g}" for g in range(len(order))]
    built = []
    for g, name in enumerate(names):
        members = np.flatnonzero(group == g)
        local = np.full(n_root, -1)
        local[members] = np.arange(members.size)

        def decide(m: np.ndarray, where: str, local: np.ndarray = local) -> np.ndarray:
            r = root_channel(m, where)
            return np.where(r >= 0, local[np.maximum(r, 0)], -1)

        built.append(build_unit(trace, name, members.size, 1, decide))
    equations = []
    for parts in trace.chunks.values():
        counts = [np.bincount(group[r[r >= 0]], minlength=len(order))
                  for r in (root_channel(part, "a chunk's part") for part in parts)]
        sizes = np.bincount(group, minlength=len(order))
        for part in counts[1:]:  # per decision of each group: its channels in part j minus in part 0
            coefficients = (part - counts[0]) // np.maximum(sizes, 1)
            if np.any((part - counts[0]) % np.maximum(sizes, 1)):
                raise NotFollowed("a chunk holds a group's decisions unevenly")
            if np.any(coefficients):
                equations.append({names[g]: int(c) for g, c in enumerate(coefficients) if c})
    return built, equations


def count_chains(sizes: Mapping[str, int], equations: Sequence[Mapping[str, int]]) -> list[dict[str, tuple[int, ...]]]:
    """Keep counts meeting ``equations`` (``sum_u a_u k_u = 0``, ``1 <= k_u <= sizes[u]``) as chains: per connected
    set of units, the options of each unit (increasing, the same number for all, the ``t``-th of each unit meeting
    the equations together; a unit the equations fix has one option). The full widths always meet them (the
    unpruned model is balanced). Raises :class:`NotFollowed` when the counts are not one chain (two or more free
    directions, or a direction that grows one unit while shrinking another)."""
    units = list(dict.fromkeys(u for eq in equations for u in eq))
    parent = {u: u for u in units}

    def find(u: str) -> str:
        while parent[u] != u:
            u = parent[u]
        return u

    for eq in equations:
        first, *rest = eq
        for u in rest:
            parent[find(u)] = find(first)
    chains = []
    for root in dict.fromkeys(find(u) for u in units):
        members = [u for u in units if find(u) == root]
        free = [u for u in members if sizes[u] > 1]  # a one-decision unit keeps its channel (counts are >= 1)
        rows = [[Fraction(eq.get(u, 0)) for u in free] for eq in equations if any(u in eq for u in members)]
        null = _null_space(rows, len(free))
        chain: dict[str, tuple[int, ...]] = {u: (sizes[u],) for u in members}
        if len(null) > 1:
            raise NotFollowed(f"the chunks' balance leaves {len(null)} free keep counts in {members}")
        if null:
            step = _primitive(null[0])
            if any(s < 0 for s in step) and any(s > 0 for s in step):
                raise NotFollowed(f"the chunks' balance shrinks some of {members} while growing others")
            step = [abs(s) for s in step]
            steps = min((sizes[u] - 1) // s for u, s in zip(free, step, strict=True) if s)
            for u, s in zip(free, step, strict=True):
                if s:
                    chain[u] = tuple(sizes[u] - t * s for t in range(steps, -1, -1))
        chains.append(chain)
    return chains


def _null_space(rows: list[list[Fraction]], n: int) -> list[list[Fraction]]:
    """A basis of ``{x : rows @ x = 0}`` over the rationals (reduced row echelon form)."""
    a = [row[:] for row in rows]
    pivots: list[int] = []
    r = 0
    for col in range(n):
        pivot = next((i for i in range(r, len(a)) if a[i][col] != 0), None)
        if pivot is None:
            continue
        a[r], a[pivot] = a[pivot], a[r]
        a[r] = [v / a[r][col] for v in a[r]]
        for i in range(len(a)):
            if i != r and a[i][col] != 0:
                a[i] = [v - a[i][col] * w for v, w in zip(a[i], a[r], strict=True)]
        pivots.append(col)
        r += 1
    basis = []
    for free in (c for c in range(n) if c not in pivots):
        x = [Fraction(0)] * n
        x[free] = Fraction(1)
        for i, col in enumerate(pivots):
            x[col] = -a[i][free]
        basis.append(x)
    return basis


def _primitive(x: list[Fraction]) -> list[int]:
    """The smallest integer multiple of ``x`` (common denominators cleared, common factor removed)."""
    lcm = math.lcm(*(v.denominator for v in x))
    ints = [int(v * lcm) for v in x]
    gcd = math.gcd(*ints)
    return [v // gcd for v in ints]
