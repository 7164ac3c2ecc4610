"""Prunable channel groups of a network, found through torch-pruning's dependency graph.

A *unit* is one decision of the whole-network problem (``shared/design.md`` section 3): the output
channels of one producing layer (a conv or Linear, the *root*), everything that is sliced with them
(BatchNorm entries, depthwise convs, element-wise ops) and the input slices of every *consumer*
(a non-depthwise conv or a Linear reading these channels). Keeping ``k`` of the ``C`` channels of a
unit leaves every consumer a least-squares problem over its ``C`` channel blocks
(:class:`orprune.layer.problem.LayerProblem`): the reconstruction that makes channel removal cheap.

Channels tied through residual adds (a ResNet stage's stream: several producers add into the same
channels) form one unit too: its producers are every conv adding into the stream (the others are
*carried*, sliced along), its consumers every conv or Linear reading it. Removing stream channel
``c`` removes it from every producer and from the identity path at once, and each consumer refits
on the remaining channels as for any unit (``residual=False`` leaves such groups alone).

Groups where that reconstruction does not apply are reported and left alone:

* the model's outputs (the classifier's logits): nothing consumes them;
* channels that go through a split with literal sizes, a slice or a channel shuffle between producer and
  consumer (torch-pruning 1.6's index maps through them are wrong, ``formulations/split_and_shuffle.md``).
  A ``chunk`` of one producer's output into equal parts is followed by orprune's own index map, with
  position ``c`` of every part tied into one decision (:mod:`orprune.network.chunks`), a residual add through the
  chunk (YOLOv8's backbone C2f) with the added convs as producers of the unit, and so is a unit that one
  concatenation reads several times (YOLOv8's SPPF), which torch-pruning's consumer layout refuses; a concatenation is
  followed: each consumer selects among the unit's columns with the other producers' columns kept,
  ``formulations/fixed_columns.md``;
* groups touching a module the user ignores, or a module orprune cannot slice per channel
  (attention, unwrapped parameters, a LayerNorm over more than the channels). A grouped conv (producer
  or consumer) or a GroupNorm ties the channels at one position of every group into one decision
  (``PrunableUnit.tie``). A LayerNorm / GroupNorm over the channels is sliced with them and then
  normalises over the kept channels only (``PrunableUnit.norms``, ``formulations/channel_norms.md``);
* channels combined with a tensor the graph does not track (the model input, a buffer, a functional
  layer's parameter). A module's own weight and bias behind an op of its forward (a fused
  BatchNorm's ``F.batch_norm``, a Linear's ``addmm`` on a 3-D input) are not such tensors;
* a grouped convolution consumer wider than ``max_features``.

A consumer whose design matrix has more than ``max_features`` columns (VGG's ``512 * 7 * 7`` classifier
input) is not left alone: its channels are selected on ``s = max_features // C`` compressed columns per
channel and its kept weights are refitted exactly (``Consumer.sketch``, :mod:`orprune.layer.wide`,
``formulations/wide_consumers.md``). A layer with one column per channel (``g = 1``) cannot be compressed
per channel: it keeps its exact problem (a ``C x C`` Gram matrix).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.ops import OPTYPE

from orprune.layer.wide import sketch_size
from orprune.network._graph_rules import (
    _PASS_THROUGH,
    _channel_norm,
    _consumer_layout,
    _following_norm,
    _has_outside_operand,
    _norms_through_concat,
    _parameter_owners,
    _pruning_fn,
)
from orprune.network.chunks import ChunkRecorder, traced_units
from orprune.network.label_maps import is_shuffle
from orprune.network.tracing import build_dependency_graph, call_model
from orprune.network.units import (
    Consumer,
    ExcludedGroup,
    ExclusionCode,
    PrunableUnit,
    PruningGraph,
    set_weight_matrix,
    weight_matrix,
)

__all__ = [
    "Consumer",
    "ExcludedGroup",
    "PrunableUnit",
    "PruningGraph",
    "build_dependency_graph",
    "call_model",
    "find_groups",
    "set_weight_matrix",
    "unit_group",
    "weight_matrix",
    "DEFAULT_MAX_FEATURES",
]

#: Largest design matrix a consumer's selection problem has by default: a 3x3 conv over 512 channels
#: (a 170 MB float64 Gram matrix). Wider consumers are compressed per channel (``Consumer.sketch``).
DEFAULT_MAX_FEATURES = 4608

# Per-channel modules that are sliced along with the unit and do not mix channels.
_CARRIED = {OPTYPE.BN, OPTYPE.IN, OPTYPE.PRELU, OPTYPE.DEPTHWISE_CONV}
_SPLITTING = {OPTYPE.SPLIT, OPTYPE.UNBIND, OPTYPE.EXPAND, OPTYPE.SLICE}
_READ_TWICE = "reads these channels out of order or partly"


def _is_out(dg: tp.DependencyGraph, item: Any) -> bool:
    return dg.is_out_channel_pruning_fn(item.dep.handler)


def _node_label(names: Mapping[Any, str], node: Any) -> str:
    return names.get(node.module) or repr(node.module)


def _dependency_groups(dg: tp.DependencyGraph) -> list[Any]:
    """Every dependency group with its full channel range (one per set of coupled outputs)."""
    return list(dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)))


def _root_of(dg: tp.DependencyGraph, items: list[Any]) -> list[Any]:
    """Items of the producing layers (conv / Linear output channels, not depthwise)."""
    return [
        it for it in items
        if _is_out(dg, it) and it.dep.target.type in (OPTYPE.CONV, OPTYPE.LINEAR)
    ]


def unit_group(dg: tp.DependencyGraph, model: nn.Module, unit: PrunableUnit, idxs: Sequence[int]) -> Any:
    """The torch-pruning group that removes channels ``idxs`` of ``unit`` (with all coupled slices)."""
    root = model.get_submodule(unit.root)
    return dg.get_pruning_group(root, _pruning_fn(root), idxs=unit.root_channels(list(idxs)))


# ------------------------------------------------------------------------------------ analysis
def _classify(
    dg: tp.DependencyGraph,
    group: Any,
    names: Mapping[nn.Module, str],
    ignored: set[str],
    max_features: int,
    output_fns: set[Any],
    residual: bool = True,
    owners: Mapping[int, nn.Module] | None = None,
    sliced: frozenset[int] = frozenset(),
) -> tuple[PrunableUnit | None, ExcludedGroup | None]:
    owners = {} if owners is None else owners
    items = group.items
    producers = _root_of(dg, items)
    labels = tuple(dict.fromkeys(
        names[it.dep.target.module] for it in items if it.dep.target.module in names))
    first = _node_label(names, (producers[0] if producers else items[0]).dep.target)

    def excluded(reason: str, code: ExclusionCode | None = None) -> tuple[None, ExcludedGroup]:
        return None, ExcludedGroup(first, labels, reason, code)

    if not producers:
        return excluded("no conv or Linear produces these channels")
    if len(producers) > 1 and not residual:
        others = ", ".join(_node_label(names, it.dep.target) for it in producers[1:])
        return excluded(f"tied through a residual add to {others} (`residual=False`)")
    root_item = producers[0]
    root = root_item.dep.target.module
    n = len(root_item.idxs)
    ties = set()  # the group counts of grouped convs producing or reading the channels
    for it in producers:  # a residual stream: every producer's channel c is the stream's channel c
        module = it.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            return excluded("a producing conv is transposed")
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
            ties.add(module.groups)  # every producer is sliced at the same (tied) channels
        if len(it.idxs) != n or list(it.idxs) != list(it.root_idxs):
            if any(other.dep.target.type in _SPLITTING for other in items):  # ShuffleNet's split + shuffle
                return excluded("goes through a split or slice and a channel shuffle (producers in another order)")
            return excluded("producers tied through a residual add do not share the channel order")
    touched = {_node_label(names, it.dep.target) for it in items} & ignored
    if touched:
        return excluded(f"touches ignored layer(s) {sorted(touched)}")
    consumers: list[tuple[nn.Module, tuple[int, tuple[int, ...] | None, int]]] = []
    carried: list[str] = []
    channel_norms: list[tuple[str, tuple[int, ...]]] = []  # LayerNorms / GroupNorms over the channels
    for it in items:
        node = it.dep.target
        # a consumer may produce the model output; the unit's own channels may not
        if _is_out(dg, it) and node.grad_fn is not None and node.grad_fn in output_fns:
            return excluded("reaches the model output", "model_output")
        if node.type == OPTYPE.ELEMENTWISE and _has_outside_operand(node, owners, sliced):
            return excluded("combined with a tensor outside the traced graph (the model input, a "
                            "buffer or a functional layer's parameter)")
        if it is root_item or node.type in _PASS_THROUGH or node.type == OPTYPE.CONCAT:
            continue  # a concatenation shifts the channels; torch-pruning follows the offsets
        if any(it is p for p in producers):  # the other producers of a residual stream
            carried.append(names[node.module])
            continue
        if node.type == OPTYPE.PARAMETER and id(node.module) in sliced:
            continue  # a per-channel parameter of no module, sliced by torch-pruning
        if node.type in _SPLITTING:
            return excluded(f"goes through a split or slice ({node.type.name.lower()})")
        if node.type == OPTYPE.OUTPUT:
            return excluded("reaches the model output", "model_output")
        if node.type in _CARRIED:
            carried.append(names[node.module])
            continue
        if node.type in (OPTYPE.LN, OPTYPE.GN) and node.module in names:
            rule = _channel_norm(node.module, list(it.idxs), list(it.root_idxs), n)
            if isinstance(rule, str):
                return excluded(f"{names[node.module]}: {rule}")
            if rule[0] > 1:
                ties.add(rule[0])
            carried.append(names[node.module])
            channel_norms.append((names[node.module], rule[1]))
            continue
        module = node.module
        if _is_out(dg, it) or node.type not in (OPTYPE.CONV, OPTYPE.LINEAR):
            return excluded(
                f"{_node_label(names, node)} ({type(module).__name__}) cannot be sliced per channel")
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "transposed", False):
            return excluded(f"consumer {names[module]} is not a Linear or a Conv2d")
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            ties.add(module.groups)
        layout = _consumer_layout(module, list(it.idxs), list(it.root_idxs), n)
        if layout is None:
            return excluded(f"consumer {names[module]} {_READ_TWICE}", "partial_read")
        consumers.append((module, layout))
    if not consumers:
        return excluded("nothing consumes these channels (model output)", "model_output")
    if len(ties) > 1:
        return excluded(f"grouped convs / GroupNorms with different group counts {sorted(ties)} share these channels")
    tie = ties.pop() if ties else 1
    if tie > 1 and any(channels is not None for _, (_, channels, _) in consumers):
        return excluded("grouped conv channels go through a concatenation")
    out = []
    for module, (g, channels, n_inputs) in consumers:
        if isinstance(module, nn.Conv2d):
            g = int(np.prod(module.kernel_size))
        sketch = sketch_size(n_inputs, g, max_features)  # the design matrix spans every input channel of the layer
        if sketch < g and getattr(module, "groups", 1) > 1:
            return excluded(
                f"grouped consumer {names[module]} would have C*g = {n_inputs}*{g} = {n_inputs * g} features > "
                f"`max_features` = {max_features}"
            )
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        n_out = module.out_features if kind == "linear" else module.out_channels
        norm = _following_norm(dg, module, names)
        norms = () if norm is not None else _norms_through_concat(dg, module, names)
        groups = module.groups if isinstance(module, nn.Conv2d) else 1
        out.append(Consumer(names[module], kind, names[root], n // tie, g, n_out, norm, channels,
                            None if channels is None else n_inputs, norms, tie, groups, sketch))
    unit = PrunableUnit(names[root], names[root], n // tie, tuple(out), tuple(dict.fromkeys(carried)), tie,
                        tuple(dict.fromkeys(channel_norms)))
    return unit, None


def find_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_layers: Iterable[nn.Module | str] = (),
    max_features: int = DEFAULT_MAX_FEATURES,
    residual: bool = True,
) -> PruningGraph:
    """Trace ``model`` and return its prunable channel groups.

    Parameters
    ----------
    model : nn.Module
        Not modified (traced once in eval mode; training flags are restored).
    example_inputs : Tensor, tuple or dict
        Inputs for one forward pass, as for ``torch_pruning.DependencyGraph.build_dependency``.
    ignored_layers : iterable of nn.Module or str
        Modules (or their qualified names) left untouched: every group that would slice one of them,
        as producer, carried module or consumer, is excluded.
    max_features : int, default ``DEFAULT_MAX_FEATURES``
        Largest ``C * g`` of a consumer's design matrix solved as it is; a wider consumer's channels are
        selected on ``max(1, max_features // C)`` compressed columns per channel (``Consumer.sketch``) and
        refitted exactly (``formulations/wide_consumers.md``). Before 0.2 such consumers were left alone.
    residual : bool, default True
        Also prune channels tied through residual adds (a ResNet stage's stream): one unit whose
        producers are every conv adding into the stream and whose consumers are every layer reading
        it. False leaves such groups alone, as before 0.1.

    Returns
    -------
    PruningGraph
        ``units`` in module order and ``excluded`` groups with reasons. Excluded groups are listed
        in one ``UserWarning``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
        raise ValueError(f"`max_features` must be a positive integer, got {max_features!r}.")
    names = {m: n for n, m in model.named_modules()}
    ignored: set[str] = set()
    for layer in ignored_layers:
        if isinstance(layer, str):
            try:
                model.get_submodule(layer)
            except AttributeError as exc:
                raise ValueError(
                    f"`ignored_layers` names {layer!r}, which is not a module of `model`."
                ) from exc
            prefix = layer
        elif isinstance(layer, nn.Module) and layer in names:
            prefix = names[layer]
        else:
            raise ValueError("`ignored_layers` must hold modules of `model` or their qualified names.")
        # ignoring a container ignores everything inside it
        ignored |= {n for n in names.values() if n == prefix or n.startswith(prefix + ".") or prefix == ""}
    record = ChunkRecorder()  # the chunks and concatenations of the forward (orprune.network.chunks)
    try:
        dg, output = build_dependency_graph(model, example_inputs, during_forward=record)
    except Exception as exc:  # tracing failures come from the user's model: say where
        raise ValueError(f"torch-pruning could not trace `model` with `example_inputs`: {exc}") from exc
    output_fns = {t.grad_fn for t in tp.utils.flatten_as_list(output) if isinstance(t, torch.Tensor)}
    owners = _parameter_owners(model)
    sliced = frozenset(id(u.parameters) for u in dg.unwrapped_parameters  # per-channel vectors only
                       if sum(size > 1 for size in u.parameters.shape) == 1)
    units, excluded = [], []
    taken: set[str] = set()  # modules of the units traced by orprune's label maps
    chains: list[Mapping[str, tuple[int, ...]]] = []  # keep counts the chunks' balance ties (traced units)
    for group in _dependency_groups(dg):
        if any(it.dep.target.type == OPTYPE.SPLIT or is_shuffle(it.dep.target, record)
               or it.dep.target.grad_fn in dg.unsized_reshapes for it in group.items):
            # torch-pruning's index maps are wrong (or missing) through a split, a shuffle, an unsized reshape
            labels = tuple(dict.fromkeys(names[it.dep.target.module] for it in group.items
                                         if it.dep.target.module in names))
            for family, producer, why in traced_units(dg, group, names, record, ignored, output_fns,
                                                      max_features, owners, sliced, taken):
                if family is not None:
                    units.extend(family.units)
                    chains.extend(family.chains)
                else:
                    excluded.append(ExcludedGroup(producer, labels, str(why), why.code))
            continue
        unit, exc_group = _classify(dg, group, names, ignored, max_features, output_fns, residual, owners, sliced)
        if unit is not None:
            units.append(unit)
        elif exc_group.code == "partial_read" and any(it.dep.target.type == OPTYPE.CONCAT for it in group.items):
            # a concatenation reading a unit several times (YOLOv8's SPPF): orprune's label maps express it
            traced = traced_units(dg, group, names, record, ignored, output_fns, max_features, owners, sliced,
                                  taken)
            if traced and all(f is not None for f, _, _ in traced):
                units.extend(u for f, _, _ in traced for u in f.units)
                chains.extend(c for f, _, _ in traced for c in f.chains)
            else:
                excluded.append(exc_group)
        else:
            excluded.append(exc_group)
    order = {n: i for i, n in enumerate(names.values())}
    units = [
        replace(u, carried=tuple(sorted(u.carried, key=order.__getitem__)),
                consumers=tuple(sorted(u.consumers, key=lambda c: order[c.name])))
        for u in sorted(units, key=lambda u: order[u.root])
    ]
    # a producer whose trace fails is met again in each torch-pruning group holding it: report it once
    excluded = sorted({(e.root, e.reason): e for e in excluded}.values(), key=lambda e: order.get(e.root, len(order)))
    # the classifier's outputs (the model output) are never prunable: nothing for the user to act on
    actionable = [e for e in excluded if e.code != "model_output"]
    if actionable:
        lines = "; ".join(f"{e.root}: {e.reason}" for e in actionable)
        warnings.warn(
            f"{len(actionable)} channel group(s) are left unpruned ({lines}).",
            UserWarning,
            stacklevel=2,
        )
    return PruningGraph(tuple(units), tuple(excluded), tuple(chains))
