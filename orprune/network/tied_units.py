"""Prunable units from a :class:`~orprune.network.label_maps.LabelTrace`: the tied unit of a chunk (decision ``c``
the class of root channel ``c``, holding root channels ``c + j n``), and :func:`build_unit`, which both it and the
balanced units of a ShuffleNetV2 stage (:mod:`orprune.network.balance`) use to read a unit's consumers, carried
modules and cost-model multiplicities from the label maps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from torch_pruning.ops import OPTYPE

from orprune.layer.wide import sketch_size
from orprune.network._graph_rules import _following_norm
from orprune.network.label_maps import LabelTrace, NotFollowed, _Ties
from orprune.network.units import Consumer, PrunableUnit

__all__ = ["build_unit", "class_lookup", "tied_unit"]


def tied_unit(trace: LabelTrace) -> tuple[PrunableUnit, dict[Any, float]]:
    """The one unit of a trace whose chunks are tied: decision ``c`` is the class of root channel ``c``, holding
    root channels ``c + j n``; with its cost-model multiplicities (see :func:`build_unit`)."""
    ties, n_root = trace.ties, len(trace.root_labels)
    decision_of = _decisions(ties, trace.root_labels)
    n = len(decision_of)

    return build_unit(trace, trace.names[trace.root], n, n_root // n,
                      lambda m, where: class_lookup(ties, decision_of, m, where))


def class_lookup(ties: _Ties, table: Mapping[int, int], m: np.ndarray, where: str) -> np.ndarray:
    """``table[class]`` of each channel of the label map ``m`` (-1 where ``m`` has none of the unit's channels);
    raises :class:`NotFollowed` for a channel whose class ``table`` lacks (not tied to the root's channels)."""
    classes = ties.classes(m).tolist()
    if any(c >= 0 and c not in table for c in classes):
        raise NotFollowed(f"{where} carries channels not tied to the root's")
    return np.array([table.get(c, -1) for c in classes], dtype=np.int64)


def build_unit(trace: LabelTrace, name: str, n: int, tie: int,
               decide: Callable[[np.ndarray, str], np.ndarray]) -> tuple[PrunableUnit, dict[Any, float]]:
    """The unit of ``n`` decisions that ``decide`` (label map -> each channel's decision, -1: none of this unit's)
    reads in the trace, and per node the channels reach, its channels in the node's output per decision (the cost
    model's multiplicities). Every tensor and consumer must hold every decision equally often."""
    names, root = trace.names, trace.root

    def decisions(m: np.ndarray, where: str) -> tuple[np.ndarray, int]:
        d = decide(m, where)
        counts = np.bincount(d[d >= 0], minlength=n)
        if np.any(counts != counts[0]):
            raise NotFollowed(f"{where} carries the unit's decisions unevenly (counts {sorted(set(counts.tolist()))})")
        return d, int(counts[0])

    out = []
    for key, node in trace.consumers.items():
        module = node.module
        decision, t = decisions(trace.inputs[key], names[module])
        if t == 0:
            continue
        order = np.argsort(decision, kind="stable")
        layout = order[decision[order] >= 0].reshape(n, t)  # (n, t) input channels of each decision, increasing
        if key in trace.features:  # a Linear after a flatten: g features per channel, its channels in_features / g
            kind, kk = "linear", trace.features[key]
            n_in, n_out = module.in_features // kk, module.out_features
        else:
            kind, kk, n_in, n_out = "conv", int(np.prod(module.kernel_size)), module.in_channels, module.out_channels
        direct = t == 1 and n_in == n and np.array_equal(layout[:, 0], np.arange(n))
        channels = None if direct else (tuple(int(c) for c in layout[:, 0]) if t == 1
                                         else tuple(tuple(int(c) for c in row) for row in layout))
        out.append(Consumer(names[module], kind, name, n, kk, n_out, _following_norm(trace.dg, module, names),
                            channels, None if direct else n_in, (), t, 1, sketch_size(n_in, kk, trace.max_features)))
    if not out:
        raise NotFollowed("nothing consumes these channels (model output)", "model_output")
    modules, widths = [], {}
    for node in trace.reach.values():
        m = None if node.type == OPTYPE.SPLIT else trace.maps.get((id(node), 0))
        if m is None:
            continue
        d, count = decisions(m, names.get(node.module) or type(node.grad_fn).__name__)
        if count == 0:
            continue
        widths[node] = float(count)
        if node.module in names:  # each output channel's root channel (decision c: root channels c + j n)
            modules.append((names[node.module], _root_channels(d, n, tie)))
    modules.sort(key=lambda item: item[0] != names[root])  # the root first
    carried = tuple(module for module, _ in modules if module != names[root])
    return PrunableUnit(name, names[root], n, tuple(out), carried, tie, (), tuple(modules)), widths


def _decisions(ties: _Ties, root_labels: np.ndarray) -> dict[int, int]:
    """Class -> decision: decision ``c`` is the class of root channel ``c``, and must hold root channels ``c + j n``
    (the ``PrunableUnit.tie`` convention)."""
    classes = ties.classes(root_labels)
    firsts = dict.fromkeys(classes.tolist())  # in order of their first root channel
    n = len(firsts)
    if n == 1 and len(root_labels) > 1:
        raise NotFollowed("the chunks and shuffles tie all of the root's channels into one decision")
    if len(root_labels) % n:
        raise NotFollowed(f"the ties split the root's {len(root_labels)} channels into {n} uneven decisions")
    decision_of = {c: i for i, c in enumerate(firsts)}
    expected = np.tile(np.arange(n), len(root_labels) // n)
    if not np.array_equal(np.array([decision_of[c] for c in classes.tolist()]), expected):
        raise NotFollowed("the chunks and shuffles tie the root's channels other than position by position "
                          "(a ShuffleNet branch width not a multiple of 2 ** its stride-1 blocks)")
    return decision_of


def _root_channels(d: np.ndarray, n: int, tie: int) -> tuple[int, ...]:
    """A module's root channel of each output channel: its ``k``-th channel of decision ``c`` stands for root
    channel ``c + (k mod tie) n`` (-1: not the unit's). Which one is immaterial: a decision goes as a whole."""
    out = np.full(len(d), -1)
    for c in range(n):
        idx = np.flatnonzero(d == c)
        out[idx] = c + (np.arange(len(idx)) % tie) * n
    return tuple(int(r) for r in out)
