"""Units whose channels pass through a ``chunk`` or a channel shuffle: followed by orprune, not torch-pruning.

torch-pruning 1.6 assigns a split's outputs to its consumers in trace order, not by output index, and maps a
channel shuffle's first ``view`` as a flatten, so its groups through these ops are wrong
(``formulations/split_and_shuffle.md`` section 1). For the groups of its dependency graph that hold a split or a
shuffle (and those where one concatenation reads a unit several times, YOLOv8's SPPF, which torch-pruning's
consumer layout refuses), :func:`traced_units` follows each producer's channels itself on the autograd graph of the
traced forward (:func:`orprune.network.label_maps.trace_unit`: label maps and their ties), with what
:class:`ChunkRecorder` saw during that forward (chunk counts, concatenation sizes, reshapes). A chunk into ``g``
equal parts ties position ``c`` of every part into one decision (``PrunableUnit.tie = g``, as for grouped
convolutions), so ``chunk`` recomputes the same part boundaries after removal; a channel shuffle ties position
``c`` of its groups, and a ShuffleNetV2 stage splits into units by where its channels go, their keep counts tied
by the chunks' exact balance (:mod:`orprune.network.balance`, section 4). Each consumer (a ``Conv2d`` with
``groups = 1``) reads the kept columns of the decisions it sees (``Consumer.channels``, shape ``(n, t)``); the other
columns of a concatenation are fixed (``formulations/fixed_columns.md``). Anything else met on the way leaves the
producer alone with the reason. Surgery slices these units by their label maps (:func:`slice_traced`), and
``apply_pruning`` checks the pruned model against the masked one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.ops import OPTYPE

from orprune.network.balance import balanced_units, count_chains
from orprune.network.label_maps import NotFollowed, follow
from orprune.network.tied_units import tied_unit
from orprune.network.units import PrunableUnit

__all__ = ["ChunkRecorder", "NotFollowed", "TracedFamily", "slice_traced", "trace_family", "traced_units"]

# methods / functions that only move a tensor's entries (replayed on channel positions to find a shuffle)
_SHAPE_OPS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "swapaxes",
              "swapdims", "movedim", "unsqueeze", "squeeze"}


class ChunkRecorder(TorchFunctionMode):
    """Records, during one forward, every ``chunk`` (grad_fn -> chunks, dim), ``cat`` (grad_fn -> dim, sizes) and
    reshape (grad_fn -> function, arguments, input shape): the autograd graph alone cannot tell ``chunk(2)`` from
    ``split(8)``, nor give a concatenation's sizes or a channel shuffle's permutation."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: dict[Any, tuple[int, int]] = {}
        self.cats: dict[Any, tuple[int, tuple[int, ...]]] = {}
        self.shapes: dict[Any, tuple[Any, tuple[Any, ...], dict[str, Any], tuple[int, ...]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        try:
            if name == "chunk" and isinstance(out, (tuple, list)) and out and out[0].grad_fn is not None:
                chunks = args[1] if len(args) > 1 else kwargs["chunks"]
                dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
                self.chunks[out[0].grad_fn] = (int(chunks), int(dim) % args[0].ndim)
            elif name in ("cat", "concat", "concatenate") and isinstance(out, torch.Tensor) and out.grad_fn is not None:
                tensors = args[0] if args else kwargs["tensors"]
                dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.ndim
                self.cats[out.grad_fn] = (dim, tuple(int(t.shape[dim]) for t in tensors))
            elif name in _SHAPE_OPS and isinstance(out, torch.Tensor) and out.grad_fn is not None \
                    and isinstance(args[0], torch.Tensor) and out.grad_fn is not args[0].grad_fn:
                self.shapes[out.grad_fn] = (func, tuple(args[1:]), dict(kwargs), tuple(args[0].shape))
        except (KeyError, IndexError, TypeError, AttributeError):  # an unusual call: not recorded, not followed
            pass
        return out

    def __call__(self, _model: nn.Module) -> ChunkRecorder:  # ``during_forward`` of build_dependency_graph
        return self


@dataclass(frozen=True)
class TracedFamily:
    """The units one producer's trace gives (one, or a ShuffleNetV2 stage's groups), each unit's cost-model
    multiplicities per node, and the chains of keep counts its chunks' balance allows (``PruningGraph.chains``)."""

    units: tuple[PrunableUnit, ...]
    widths: Mapping[str, Mapping[Any, float]]
    chains: tuple[Mapping[str, tuple[int, ...]], ...] = ()


def trace_family(dg: Any, root: nn.Module, names: Mapping[nn.Module, str], record: ChunkRecorder, ignored: set[str],
                 output_fns: set[Any], max_features: int, owners: Mapping[int, nn.Module],
                 sliced: frozenset[int]) -> TracedFamily:
    """The units of producer ``root`` (raises :class:`NotFollowed` with the reason). Through a channel shuffle the
    chunks are balanced exactly (:mod:`orprune.network.balance`); where their counts are not one chain, they are
    tied position by position instead (one unit, coarser)."""
    args = (dg, root, names, record, ignored, output_fns, max_features, owners, sliced)
    trace = follow(*args)
    balance_reason = None
    if trace.shuffled:
        try:
            built, equations = balanced_units(trace)
            chains = count_chains({unit.name: unit.n_channels for unit, _ in built}, equations)  # raises if not one
            return TracedFamily(tuple(unit for unit, _ in built), {unit.name: w for unit, w in built}, tuple(chains))
        except NotFollowed as exc:
            balance_reason = str(exc)
        trace = follow(*args, balance=False)
    try:
        unit, widths = tied_unit(trace)
    except NotFollowed as exc:
        if balance_reason:
            raise NotFollowed(f"{exc}; balanced exactly: {balance_reason}", exc.code) from None
        raise
    return TracedFamily((unit,), {unit.name: widths})


def traced_units(dg: Any, group: Any, names: Mapping[nn.Module, str], record: ChunkRecorder, ignored: set[str],
                 output_fns: set[Any], max_features: int, owners: Mapping[int, nn.Module],
                 sliced: frozenset[int], taken: set[str] | None = None,
                 ) -> list[tuple[TracedFamily | None, str, NotFollowed | None]]:
    """``(family, producer, why)`` for every conv producing channels of ``group`` (a group holding a split or a
    shuffle). ``taken``: modules of units already traced (from other groups), skipped and extended in place: a conv
    pulled into a unit (a stream's or a shuffle's other producer) is that unit's, whichever group lists it."""
    taken = set() if taken is None else taken
    producers = dict.fromkeys(
        it.dep.target.module for it in group.items
        if dg.is_out_channel_pruning_fn(it.dep.handler) and it.dep.target.type == OPTYPE.CONV)
    out: list[tuple[TracedFamily | None, str, NotFollowed | None]] = []
    for module in producers:
        label = names.get(module, repr(module))
        if label in taken:
            continue
        try:
            family = trace_family(dg, module, names, record, ignored, output_fns, max_features, owners, sliced)
        except NotFollowed as exc:
            out.append((None, label, exc))
            continue
        out.append((family, label, None))
        taken.update(name for unit in family.units for name, _ in unit.traced)
    return [(family, label, why) for family, label, why in out if family is not None or label not in taken]


def slice_traced(model: nn.Module, units: Iterable[tuple[PrunableUnit, np.ndarray]]) -> None:
    """In place: remove the dropped decisions of traced units (``PrunableUnit.traced``) by their label maps.

    Each unit's modules lose their channels of the dropped root channels (a conv its outputs, a depthwise conv its
    channels, a BatchNorm its entries); each consumer loses its input channels of every traced unit. A module or
    consumer shared by several units (a concatenation's reader, a ShuffleNetV2 stage's groups) is sliced once,
    after every unit's channels are gathered, since the maps index the unsliced module."""
    units = list(units)
    outputs: dict[str, set[int]] = {}
    inputs: dict[str, set[int]] = {}
    for unit, dropped in units:
        gone = set(unit.root_channels(dropped))
        for name, channels in unit.traced:
            outputs.setdefault(name, set()).update(k for k, r in enumerate(channels) if r in gone)
        for consumer in unit.consumers:
            inputs.setdefault(consumer.name, set()).update(
                int(c) for c in np.asarray(consumer.input_channels)[np.asarray(dropped)].ravel())
    for name, idxs in outputs.items():
        module = model.get_submodule(name)
        if not idxs:
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            tp.prune_depthwise_conv_out_channels(module, sorted(idxs))
        elif isinstance(module, nn.Conv2d):
            tp.prune_conv_out_channels(module, sorted(idxs))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            tp.prune_batchnorm_out_channels(module, sorted(idxs))
        elif any(True for _ in module.parameters(recurse=False)):
            raise RuntimeError(f"{name} ({type(module).__name__}) cannot be sliced with a traced unit")
    groups = {c.name: c.group_size for unit, _ in units for c in unit.consumers if c.kind == "linear"}
    for name, idxs in inputs.items():
        module = model.get_submodule(name)
        if not idxs:
            continue
        if isinstance(module, nn.Linear):  # each input channel is group_size features
            g = groups[name]
            tp.prune_linear_in_channels(module, sorted(c * g + j for c in idxs for j in range(g)))
        else:
            tp.prune_conv_in_channels(module, sorted(idxs))
