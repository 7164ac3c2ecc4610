"""Units whose channels pass through a ``chunk``: index maps read from the autograd graph, not torch-pruning's.

torch-pruning 1.6 assigns a split's outputs to its consumers in trace order, not by output index, and its groups
through a split are wrong (``formulations/split_and_shuffle.md`` section 1). For the groups of its dependency
graph that hold a split (and those where one concatenation reads a unit several times, YOLOv8's SPPF, which
torch-pruning's consumer layout refuses), :func:`traced_units` follows each producer's channels itself, on the
autograd graph of the traced forward:

* per-channel ops (BatchNorm, activations, pooling, upsampling) keep the map;
* ``x.chunk(g, 1)`` of the producer's whole output into ``g`` equal parts sends root channel ``c + j n``
  (``n = C / g``) to channel ``c`` of part ``j`` (the ``output_nr`` each reader takes from ``SplitBackward0``);
* ``torch.cat(..., 1)`` concatenates its inputs' maps (the sizes are recorded during the forward);
* a residual add of the stream and a conv's output (YOLOv8's backbone C2f, ``shortcut=True``: ``s + cv2(cv1(s))``)
  makes that conv, with the BatchNorm and per-channel ops before the add, another producer of the unit: its
  channel ``i`` carries the stream's root channel at ``i`` and is sliced with it (``PrunableUnit.carried``).

The maps are *label maps*: each channel of a tensor gives the root channel it carries (-1: another unit's), so a
concatenation may read the same stream at several points (C2f's ``cv2`` reads the part and every bottleneck's sum).

Pruning commutes with the chunk iff every part keeps as many channels (section 2); the unit ties position ``c``
of every part into one decision (``PrunableUnit.tie = g``, as for grouped convolutions), so ``chunk`` recomputes
the same part boundaries after removal. Each consumer (a ``Conv2d`` with ``groups = 1``) reads the kept columns of
its own parts (``Consumer.channels``, shape ``(n, t)``); the other columns of a concatenation are fixed
(``formulations/fixed_columns.md``). Everything else met on the way (a split with literal sizes, a second split,
an op with a second operand other than such a residual add, a reshape or channel shuffle, a Linear, a module with
parameters other than a BatchNorm) leaves the producer alone with the reason (``formulations/split_and_shuffle.md``
section 3). Surgery slices these units by the recorded maps (:func:`slice_traced`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.ops import OPTYPE

from orprune.layer.wide import sketch_size
from orprune.network._graph_rules import _following_norm, _has_outside_operand
from orprune.network.units import Consumer, PrunableUnit

__all__ = ["ChunkRecorder", "slice_traced", "trace_unit", "traced_units"]

# grad_fn names of ops that act on each channel alone (activations, pooling, upsampling, copies)
_PER_CHANNEL = {
    "ReluBackward0", "SiluBackward0", "SigmoidBackward0", "GeluBackward0", "HardswishBackward0",
    "HardsigmoidBackward0", "LeakyReluBackward0", "EluBackward0", "TanhBackward0", "MishBackward0",
    "HardtanhBackward0", "ClampBackward1", "CloneBackward0", "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "UpsampleNearest2DBackward0",
    "UpsampleBilinear2DBackward0",
}


class ChunkRecorder(TorchFunctionMode):
    """Records, during one forward, every ``chunk`` (grad_fn -> chunks, dim) and ``cat`` (grad_fn -> dim, sizes):
    the autograd graph alone cannot tell ``chunk(2)`` from ``split(8)``, nor give a concatenation's sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: dict[Any, tuple[int, int]] = {}
        self.cats: dict[Any, tuple[int, tuple[int, ...]]] = {}

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
        except (KeyError, IndexError, TypeError, AttributeError):  # an unusual call: not recorded, not followed
            pass
        return out

    def __call__(self, _model: nn.Module) -> ChunkRecorder:  # ``during_forward`` of build_dependency_graph
        return self


class _NotBuilt(ValueError):
    """A producer whose channels meet something this module does not follow (the message is the reason)."""


def traced_units(dg: Any, group: Any, names: Mapping[nn.Module, str], record: ChunkRecorder, ignored: set[str],
                 output_fns: set[Any], max_features: int, owners: Mapping[int, nn.Module],
                 sliced: frozenset[int]) -> list[tuple[PrunableUnit | None, str, str | None]]:
    """``(unit, producer, reason)`` for every conv producing channels of ``group`` (a group holding a split)."""
    producers = dict.fromkeys(
        it.dep.target.module for it in group.items
        if dg.is_out_channel_pruning_fn(it.dep.handler) and it.dep.target.type == OPTYPE.CONV)
    out = []
    for module in producers:
        label = names.get(module, repr(module))
        try:
            unit, _ = trace_unit(dg, module, names, record, ignored, output_fns, max_features, owners, sliced)
            out.append((unit, label, None))
        except _NotBuilt as exc:
            out.append((None, label, str(exc)))
    # a conv adding into a unit's stream through the chunk is that unit's (its own trace fails or repeats it)
    owned = {name for unit, _, _ in out if unit is not None for name, _ in unit.traced[1:]}
    return [(unit, label, reason) for unit, label, reason in out if label not in owned]


def trace_unit(dg: Any, root: nn.Module, names: Mapping[nn.Module, str], record: ChunkRecorder, ignored: set[str],
               output_fns: set[Any], max_features: int, owners: Mapping[int, nn.Module],
               sliced: frozenset[int]) -> tuple[PrunableUnit, dict[Any, float]]:
    """The unit of producer ``root`` and, per node of ``dg`` its channels reach, the unit's channels in that
    node's output per decision (the cost model's multiplicities); raises ``_NotBuilt`` with the reason.

    Every tensor on the way gets a *label map*: the root channel each of its channels carries (-1: another
    unit's). A residual add of the stream with a conv's output (YOLOv8's ``x + cv2(cv1(x))``) makes that conv
    (and the BatchNorm / per-channel ops between) another producer of the stream: its channel ``i`` carries the
    stream's label at ``i`` (as the other producers of a ResNet stream are carried along its root)."""
    if not isinstance(root, nn.Conv2d) or root.groups != 1 or root.transposed or root not in names:
        raise _NotBuilt("goes through a split; only a Conv2d (groups=1) producer is followed there")
    by_fn = {n.grad_fn: n for n in dg.module2node.values() if n.grad_fn is not None}
    root_node, n_root = dg.module2node[root], root.out_channels
    reach: dict[int, Any] = {id(root_node): root_node}
    consumers: dict[int, Any] = {}
    anchor: dict[int, Any] = {}  # a stream producer's node (and those up to the add) -> the add it feeds

    def walk(todo: list[Any]) -> None:  # the nodes the channels flow through, up to the consumers
        while todo:
            node = todo.pop()
            if id(node) in reach or id(node) in consumers:
                continue
            if node.type == OPTYPE.CONV and isinstance(node.module, nn.Conv2d) and node.module.groups == 1:
                consumers[id(node)] = node
                continue
            reach[id(node)] = node
            todo.extend(node.outputs)

    def per_channel(node: Any) -> bool:
        """A BatchNorm, or a parameter-free op on each channel alone with no operand from outside."""
        if node.type == OPTYPE.BN:
            return node.module in names
        return (node.type == OPTYPE.ELEMENTWISE and type(node.grad_fn).__name__ in _PER_CHANNEL
                and not _has_outside_operand(node, owners, sliced)
                and not any(True for _ in getattr(node.module, "parameters", lambda: ())()))

    def label(node: Any) -> str:
        return names.get(node.module) or type(node.grad_fn).__name__

    def stream_producer(src: Any, add: Any) -> list[Any]:
        """Mark the conv whose output (through BatchNorm / per-channel ops) ``add`` adds to the stream."""
        path = []
        while True:
            module = src.module
            if id(src) in consumers:
                raise _NotBuilt(f"{label(src)} reads and writes the residual stream through the chunk")
            path.append(src)
            if src.type == OPTYPE.CONV and isinstance(module, nn.Conv2d) and module.groups == 1 \
                    and not module.transposed and module in names:
                break
            if not per_channel(src) or len(src.inputs) != 1 or len(src.outputs) != 1:
                raise _NotBuilt(f"goes through a chunk and a residual add of {label(src)} "
                                f"({src.type.name.lower()}), not a conv's output")
            src = src.inputs[0]
        for node in path:
            anchor[id(node)] = add
            reach[id(node)] = node
        return [out for node in path for out in node.outputs]

    walk(list(root_node.outputs))
    while True:  # residual adds: their other operands' producers join the stream, then what they reach
        todo = []
        for node in list(reach.values()):
            if node.grad_fn is None or type(node.grad_fn).__name__ != "AddBackward0":
                continue
            for f, _ in node.grad_fn.next_functions:
                src = by_fn.get(f) if f is not None else None
                if src is not None and id(src) not in reach and src.type != OPTYPE.PARAMETER:
                    todo += stream_producer(src, node)
        if not todo:
            break
        walk(todo)
    producers = [node for node in reach.values() if id(node) in anchor and node.type == OPTYPE.CONV]
    if any(id(i) in reach for p in producers for i in p.inputs):
        raise _NotBuilt("a conv adding into the stream through the chunk also reads it")
    maps: dict[tuple[int, int], np.ndarray] = {}
    splits: list[Any] = []

    def edges(node: Any) -> list[tuple[Any, int, int]]:
        """(input node, output_nr, position among the operands) of the unit's inputs of ``node``."""
        fns = node.grad_fn.next_functions if node.grad_fn is not None else ()
        return [(by_fn[f], nr, k) for k, (f, nr) in enumerate(fns)
                if f is not None and f in by_fn and id(by_fn[f]) in reach]

    def map_of(node: Any, nr: int) -> np.ndarray:
        """Root channel carried by each channel of output ``nr`` of ``node`` (-1: none of the unit's)."""
        key = (id(node), nr)
        if key not in maps:
            maps[key] = _map(node, nr)
        return maps[key]

    def _map(node: Any, nr: int) -> np.ndarray:
        if node is root_node:
            return np.arange(n_root)
        if node.grad_fn in output_fns or node.type == OPTYPE.OUTPUT:
            raise _NotBuilt("reaches the model output")
        if id(node) in anchor:  # a producer of the stream, or what lies between it and the add
            m = map_of(anchor[id(node)], 0)
            width = node.module.out_channels if node.type == OPTYPE.CONV else len(m)
            if np.any(m < 0) or width != len(m):
                raise _NotBuilt(f"{label(node)} adds into channels of the stream that are not all the unit's")
            return m
        inputs = edges(node)
        if node.type == OPTYPE.CONCAT:
            dim, sizes = record.cats.get(node.grad_fn, (None, ()))
            if dim != 1 or len(sizes) != len(node.grad_fn.next_functions):
                raise _NotBuilt(f"goes through a split and a concatenation not along the channels ({label(node)})")
            parts = [np.full(size, -1) for size in sizes]
            for src, src_nr, k in inputs:
                parts[k] = map_of(src, src_nr)
                if len(parts[k]) != sizes[k]:
                    raise _NotBuilt(f"the channels of {label(node)} do not match its inputs")
            return np.concatenate(parts)
        if type(node.grad_fn).__name__ == "AddBackward0" and len(inputs) == 2 == len(node.grad_fn.next_functions) \
                and not _has_outside_operand(node, owners, sliced):
            stream = [map_of(src, src_nr) for src, src_nr, _ in inputs if anchor.get(id(src)) is not node]
            if not stream or any(not np.array_equal(m, stream[0]) for m in stream[1:]):
                raise _NotBuilt(f"goes through a split and {label(node)} adds different channels of the unit")
            return stream[0]
        if len(inputs) != 1 or len(node.inputs) != 1:
            raise _NotBuilt(f"goes through a split and then {label(node)} combines it with another tensor "
                            "(only a residual add of a conv's output is followed)")
        m = map_of(inputs[0][0], inputs[0][1])
        if node.type == OPTYPE.SPLIT:
            return _part(node, nr, m)
        if per_channel(node):
            return m
        if node.type == OPTYPE.RESHAPE:
            raise _NotBuilt(f"goes through a split or chunk and a reshape ({label(node)}: a channel shuffle is not "
                            "built, formulations/split_and_shuffle.md)")
        raise _NotBuilt(f"goes through a split or chunk and then {label(node)} ({node.type.name.lower()}), "
                        "which orprune does not follow there")

    def _part(node: Any, nr: int, m: np.ndarray) -> np.ndarray:
        fn = node.grad_fn
        kind = type(fn).__name__
        if kind == "SplitWithSizesBackward0":
            raise _NotBuilt(f"goes through a split with literal sizes {list(fn._saved_split_sizes)} (they no longer "
                            "sum to the channel count once channels are removed)")
        if kind != "SplitBackward0" or fn not in record.chunks:
            raise _NotBuilt(f"goes through a split or slice ({kind}; only `chunk` is followed)")
        chunks, dim = record.chunks[fn]
        width, size = int(fn._saved_self_sym_sizes[1]), int(fn._saved_split_size)
        if dim != 1 or width != n_root or not np.array_equal(m, np.arange(n_root)):
            raise _NotBuilt("goes through a chunk of more or other channels than one producer's output")
        if chunks < 1 or width % chunks or size != width // chunks:
            raise _NotBuilt(f"goes through a chunk into unequal parts ({width} channels in {chunks})")
        if splits and splits[0] is not node:
            raise _NotBuilt("goes through two chunks")
        splits.append(node)
        return m[nr * size:(nr + 1) * size]

    for node in list(reach.values()) + list(consumers.values()):
        if node.module in names and names[node.module] in ignored:
            raise _NotBuilt(f"touches ignored layer(s) {[names[node.module]]}")
    for node in reach.values():  # every tensor on the way: its map (raises where nothing is followed)
        if node.type != OPTYPE.SPLIT:
            map_of(node, 0)
    inputs = {}
    for node in consumers.values():  # what each consumer reads (a chunk's part may go straight to a conv)
        (src, nr, k), *more = edges(node) or [(None, 0, 1)]
        if src is None or more or k != 0:
            raise _NotBuilt(f"{names.get(node.module, node.module)} reads these channels other than as its input")
        inputs[id(node)] = map_of(src, nr)
    tie = splits[0].grad_fn._saved_self_sym_sizes[1] // splits[0].grad_fn._saved_split_size if splits else 1
    n = n_root // tie
    out = []
    for node in consumers.values():
        module = node.module
        decision = np.where(inputs[id(node)] >= 0, inputs[id(node)] % n, -1)  # root channel c + j n: decision c
        counts = np.bincount(decision[decision >= 0], minlength=n)
        t = int(counts[0])
        if t == 0 or np.any(counts != t):
            raise _NotBuilt(f"{names[module]} reads the parts of the chunk unevenly")
        order = np.argsort(decision, kind="stable")
        layout = order[decision[order] >= 0].reshape(n, t)  # (n, t) input channels of each decision, increasing
        kk, n_in = int(np.prod(module.kernel_size)), module.in_channels
        direct = t == 1 and n_in == n and np.array_equal(layout[:, 0], np.arange(n))
        channels = None if direct else (tuple(int(c) for c in layout[:, 0]) if t == 1
                                         else tuple(tuple(int(c) for c in row) for row in layout))
        out.append(Consumer(names[module], "conv", names[root], n, kk, module.out_channels,
                            _following_norm(dg, module, names), channels, None if direct else n_in, (), t, 1,
                            sketch_size(n_in, kk, max_features)))
    if not out:
        raise _NotBuilt("nothing consumes these channels (model output)")
    modules = []
    for node in reach.values():  # each module's output channel of every root channel (what slicing removes)
        if node.module not in names or node.type == OPTYPE.SPLIT:
            continue
        m = map_of(node, 0)
        kept = np.flatnonzero(m >= 0)
        if np.unique(m[kept]).size != kept.size:
            raise _NotBuilt(f"{names[node.module]} carries a channel of the unit twice")
        channels = np.full(n_root, -1)
        channels[m[kept]] = kept
        modules.append((names[node.module], tuple(int(c) for c in channels)))
    carried = tuple(name for name, _ in modules if name != names[root])
    widths = {node: float((map_of(node, 0) >= 0).sum()) / n for node in reach.values() if node.type != OPTYPE.SPLIT}
    unit = PrunableUnit(names[root], names[root], n, tuple(out), carried, tie, (), tuple(modules))
    return unit, widths


def slice_traced(model: nn.Module, units: Iterable[tuple[PrunableUnit, np.ndarray]]) -> None:
    """In place: remove the dropped decisions of chunk-traced units (``PrunableUnit.traced``) by their maps.

    Each unit's modules lose their channels of the dropped root channels (a conv its outputs, a BatchNorm its
    entries); each consumer loses its input channels of every traced unit at once (a concatenation reads several)."""
    inputs: dict[str, set[int]] = {}
    for unit, dropped in units:
        gone = unit.root_channels(dropped)
        for name, channels in unit.traced:
            idxs = sorted({channels[r] for r in gone if channels[r] >= 0})
            module = model.get_submodule(name)
            if not idxs:
                continue
            if isinstance(module, nn.Conv2d):
                tp.prune_conv_out_channels(module, idxs)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                tp.prune_batchnorm_out_channels(module, idxs)
            elif any(True for _ in module.parameters(recurse=False)):
                raise RuntimeError(f"{name} ({type(module).__name__}) cannot be sliced with a chunked unit")
        for consumer in unit.consumers:
            inputs.setdefault(consumer.name, set()).update(
                int(c) for c in np.asarray(consumer.input_channels)[np.asarray(dropped)].ravel())
    for name, idxs in inputs.items():
        if idxs:
            tp.prune_conv_in_channels(model.get_submodule(name), sorted(idxs))
