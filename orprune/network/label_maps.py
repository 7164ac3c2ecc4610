"""One unit's channels followed on the autograd graph by *label maps*, with ties kept in a union-find.

Every tensor the unit's channels reach gets a label map: the label each of its channels carries (-1: none of the
unit's). The root conv's channels are labels ``0 .. C-1``; a conv pulled into the unit (below) gets fresh labels.
The ops on the way tie labels (they must be kept or removed together), and the union-find of those ties gives the
decisions (``formulations/split_and_shuffle.md`` sections 2-3):

* per-channel ops (BatchNorm, activations, pooling, upsampling, depthwise convs) keep the map;
* ``torch.cat(..., 1)`` concatenates its inputs' maps;
* ``x.chunk(g, 1)`` into ``g`` equal parts ties position ``p`` of every part (equal counts per part is what the
  chunk needs; the position tie is the simplest sufficient form) and gives part ``j`` its slice of the map; on a
  path with a channel shuffle the chunk is instead recorded, and its exact condition kept as a balance between
  units (:mod:`orprune.network.balance`);
* a residual add ties its operands channel by channel; a conv whose output (through BatchNorm / per-channel ops)
  is added into the stream is pulled into the unit (YOLOv8's ``s + cv2(cv1(s))``);
* a channel shuffle (``view(b, g, C/g, h, w)``, ``transpose(1, 2)``, ``view(b, C, h, w)``; the permutation is
  found by replaying the recorded ops on channel positions) ties position ``p`` of every one of its ``g`` input
  groups: then the pruned shuffle sends the kept channels where the masked one does. The convs concatenated into
  a shuffle are pulled into the unit (ShuffleNetV2's branches).

With tied chunks (:func:`orprune.network.tied_units.tied_unit`) the unit has one decision per class of tied
labels; decision ``c`` must stand for the root channels ``c + j n`` (``PrunableUnit.tie``), and every tensor and
consumer must carry every decision equally often, so each decision has one cost
(:func:`orprune.network.tied_units.build_unit`). Anything else leaves the producer alone with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch_pruning.ops import OPTYPE

from orprune.network._graph_rules import _has_outside_operand

__all__ = ["LabelTrace", "NotFollowed", "follow", "is_shuffle"]

# grad_fn names of ops that act on each channel alone (activations, pooling, upsampling, copies)
_PER_CHANNEL = {
    "ReluBackward0", "SiluBackward0", "SigmoidBackward0", "GeluBackward0", "HardswishBackward0",
    "HardsigmoidBackward0", "LeakyReluBackward0", "EluBackward0", "TanhBackward0", "MishBackward0",
    "HardtanhBackward0", "ClampBackward1", "CloneBackward0", "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "UpsampleNearest2DBackward0",
    "UpsampleBilinear2DBackward0",
}


class NotFollowed(ValueError):
    """A producer whose channels meet something orprune does not follow (the message is the reason; ``code`` as
    :class:`orprune.network.units.ExcludedGroup`'s)."""

    def __init__(self, reason: str, code: str | None = None) -> None:
        super().__init__(reason)
        self.code = code


class _Ties:
    """Union-find over labels."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, k: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + k))
        return np.arange(start, start + k)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def classes(self, labels: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(a)) if a >= 0 else -1 for a in labels], dtype=np.int64)


def is_shuffle(node: Any, record: Any) -> bool:
    """The ``transpose`` of a channel shuffle: of a 5-D view (``(b, g, C/g, h, w)``) of the channels."""
    shape = record.shapes.get(node.grad_fn)
    return type(node.grad_fn).__name__ == "TransposeBackward0" and shape is not None and len(shape[3]) == 5


def _spatial_mean(node: Any) -> bool | None:
    """For a mean over dims that leave the channels (dim 1) alone (``adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``):
    whether it keeps the reduced dims; None for any other node."""
    fn = node.grad_fn
    if type(fn).__name__ != "MeanBackward1":
        return None
    ndim = len(fn._saved_self_sym_sizes)
    dims = {(d - (1 << 64) if d >= 1 << 63 else d) % ndim for d in fn._saved_dim}
    return bool(fn._saved_keepdim) if ndim >= 2 and 0 not in dims and 1 not in dims else None


def _shuffle_groups(perm: np.ndarray) -> int:
    """``g`` if ``perm`` (output channel -> input channel) is a channel shuffle with ``g`` groups, 1 if identity."""
    size = len(perm)
    if np.array_equal(perm, np.arange(size)):
        return 1
    for g in range(2, size):
        if size % g == 0 and np.array_equal(perm, np.arange(size).reshape(g, size // g).T.ravel()):
            return g
    return 0


@dataclass
class LabelTrace:
    """What :func:`follow` found: the nodes the root's channels reach, every tensor's label map, the consumers'
    input maps, the ties, and each chunk's parts (for the exact balance)."""

    dg: Any
    root: nn.Module
    names: Mapping[nn.Module, str]
    max_features: int
    root_labels: np.ndarray
    reach: dict[int, Any]
    consumers: dict[int, Any]
    inputs: dict[int, np.ndarray]  # consumer node id -> label map of its input
    maps: dict[tuple[int, int], np.ndarray | None]  # (node id, output nr) -> label map
    ties: _Ties
    chunks: dict[int, list[np.ndarray]]  # split node id -> its parts' label maps
    shuffled: bool  # a channel shuffle is on the path and ``balance``: its chunks are balanced exactly, not tied
    features: dict[int, int]  # Linear consumer node id -> features per channel (``inputs`` is per channel)


def follow(dg: Any, root: nn.Module, names: Mapping[nn.Module, str], record: Any, ignored: set[str],
           output_fns: set[Any], max_features: int, owners: Mapping[int, nn.Module],
           sliced: frozenset[int], balance: bool = True) -> LabelTrace:
    """Follow producer ``root``'s channels through the traced graph ``dg`` (see the module docstring); raises
    :class:`NotFollowed` with the reason. ``record`` is the :class:`orprune.network.chunks.ChunkRecorder` of the
    traced forward (chunks, concatenation sizes, reshapes). With ``balance``, a chunk on a path with a channel
    shuffle is not tied but recorded (``LabelTrace.chunks``): its exact condition, equal kept counts per part, is a
    balance between units (:mod:`orprune.network.balance`)."""
    if not isinstance(root, nn.Conv2d) or root.groups != 1 or root.transposed or root not in names:
        raise NotFollowed("goes through a split or shuffle; only a Conv2d (groups=1) producer is followed there")
    by_fn = {n.grad_fn: n for n in dg.module2node.values() if n.grad_fn is not None}
    root_node, n_root = dg.module2node[root], root.out_channels
    reach: dict[int, Any] = {id(root_node): root_node}
    consumers: dict[int, Any] = {}
    pulled: dict[int, Any] = {}  # convs pulled into the unit by a residual add or a shuffle

    def label(node: Any) -> str:
        return names.get(node.module) or type(node.grad_fn).__name__

    def kind(node: Any) -> str:
        return type(node.grad_fn).__name__

    def depthwise(node: Any) -> bool:
        m = node.module
        return (isinstance(m, nn.Conv2d) and not m.transposed and m.groups > 1
                and m.groups == m.in_channels == m.out_channels and m in names)

    def walk(todo: list[Any]) -> None:  # the nodes the channels flow through, up to the consumers
        while todo:
            node = todo.pop()
            if id(node) in reach or id(node) in consumers:
                continue
            if (node.type == OPTYPE.CONV and isinstance(node.module, nn.Conv2d) and node.module.groups == 1) or \
                    (node.type == OPTYPE.LINEAR and isinstance(node.module, nn.Linear)):
                consumers[id(node)] = node
                continue
            reach[id(node)] = node
            todo.extend(node.outputs)

    def per_channel(node: Any) -> bool:
        """A BatchNorm, a depthwise conv, or a parameter-free op on each channel alone, nothing from outside."""
        if node.type == OPTYPE.BN:
            return node.module in names
        if depthwise(node):
            return True
        return (node.type == OPTYPE.ELEMENTWISE and (kind(node) in _PER_CHANNEL or _spatial_mean(node) is not None)
                and not _has_outside_operand(node, owners, sliced)
                and not any(True for _ in getattr(node.module, "parameters", lambda: ())()))

    def into_reshape(node: Any) -> bool:
        """A concatenation whose output goes only into a reshape (a channel shuffle's first view)."""
        return bool(node.outputs) and all(o.grad_fn in record.shapes for o in node.outputs)

    def pull(src: Any, joint: Any) -> list[Any]:
        """Pull into the unit the conv whose output (through BatchNorm / per-channel ops) ``joint`` combines with
        the unit's channels; the nodes to walk on from."""
        path = []
        while True:
            module = src.module
            if id(src) in consumers:
                raise NotFollowed(f"{label(src)} reads the unit's channels and writes into them ({label(joint)})")
            path.append(src)
            if src.type == OPTYPE.CONV and isinstance(module, nn.Conv2d) and module.groups == 1 \
                    and not module.transposed and module in names:
                break
            if not per_channel(src) or len(src.inputs) != 1 or len(src.outputs) != 1:
                raise NotFollowed(f"{label(joint)} combines the unit's channels with {label(src)} "
                                  f"({src.type.name.lower()}), not a conv's output")
            src = src.inputs[0]
        pulled[id(path[-1])] = path[-1]
        for node in path:
            reach[id(node)] = node
        return [out for node in path for out in node.outputs]

    walk(list(root_node.outputs))
    while True:  # residual adds and shuffled concatenations: their other operands' convs join the unit
        todo = []
        for node in list(reach.values()):
            if node.grad_fn is None or not (kind(node) == "AddBackward0" or
                                            (node.type == OPTYPE.CONCAT and into_reshape(node))):
                continue
            for f, _ in node.grad_fn.next_functions:
                src = by_fn.get(f) if f is not None else None
                if src is not None and id(src) not in reach and src.type != OPTYPE.PARAMETER:
                    todo += pull(src, node)
        if not todo:
            break
        walk(todo)
    shuffled = balance and any(is_shuffle(node, record) for node in reach.values())
    if any(id(i) in reach for p in pulled.values() for i in p.inputs):
        raise NotFollowed("a conv writing into the unit's channels also reads them")
    for node in list(reach.values()) + list(consumers.values()):
        if node.module in names and names[node.module] in ignored:
            raise NotFollowed(f"touches ignored layer(s) {[names[node.module]]}")

    ties = _Ties()
    root_labels = ties.new(n_root)
    maps: dict[tuple[int, int], np.ndarray | None] = {}
    chunk_parts: dict[int, list[np.ndarray]] = {}
    flattened: dict[int, int] = {}  # a flatten's node id -> features per channel

    def edges(node: Any) -> list[tuple[Any, int, int]]:
        """(input node, output_nr, position among the operands) of the unit's inputs of ``node``."""
        fns = node.grad_fn.next_functions if node.grad_fn is not None else ()
        return [(by_fn[f], nr, k) for k, (f, nr) in enumerate(fns)
                if f is not None and f in by_fn and id(by_fn[f]) in reach]

    def map_of(node: Any, nr: int) -> np.ndarray | None:
        """Label of each channel of output ``nr`` of ``node`` (-1: none of the unit's); None inside a reshape
        (no channel axis)."""
        key = (id(node), nr)
        if key not in maps:
            maps[key] = _map(node, nr)
        return maps[key]

    def channel_map(node: Any, nr: int = 0) -> np.ndarray:
        m = map_of(node, nr)
        if m is None:
            raise NotFollowed(f"goes through a reshape that does not end in channels ({label(node)})")
        return m

    def _map(node: Any, nr: int) -> np.ndarray | None:
        if node is root_node:
            return root_labels
        if node.grad_fn in output_fns or node.type == OPTYPE.OUTPUT:
            raise NotFollowed("reaches the model output", "model_output")
        if id(node) in pulled:
            return ties.new(node.module.out_channels)
        if node.grad_fn in record.shapes:
            return _reshaped(node)
        inputs = edges(node)
        if node.type == OPTYPE.CONCAT:
            dim, sizes = record.cats.get(node.grad_fn, (None, ()))
            if dim != 1 or len(sizes) != len(node.grad_fn.next_functions):
                raise NotFollowed(f"goes through a concatenation not along the channels ({label(node)})")
            parts = [np.full(size, -1) for size in sizes]
            for src, src_nr, k in inputs:
                parts[k] = channel_map(src, src_nr)
                if len(parts[k]) != sizes[k]:
                    raise NotFollowed(f"the channels of {label(node)} do not match its inputs")
            return np.concatenate(parts)
        if kind(node) == "AddBackward0" and len(inputs) == 2 == len(node.grad_fn.next_functions) \
                and not _has_outside_operand(node, owners, sliced):
            a, b = (channel_map(src, src_nr) for src, src_nr, _ in inputs)
            if len(a) != len(b) or not np.array_equal(a >= 0, b >= 0):
                raise NotFollowed(f"{label(node)} adds the unit's channels to others")
            ties.union(a[a >= 0], b[b >= 0])
            return a
        if len(inputs) != 1 or len(node.inputs) != 1:
            raise NotFollowed(f"{label(node)} combines the unit's channels with another tensor "
                              "(only a residual add of a conv's output is followed)")
        m = channel_map(inputs[0][0], inputs[0][1])
        if node.type == OPTYPE.SPLIT:
            return _part(node, nr, m)
        if per_channel(node):
            return m
        raise NotFollowed(f"goes through {label(node)} ({node.type.name.lower()}), which orprune does not follow "
                          "on a split, chunk or shuffle path")

    def _positions(node: Any) -> tuple[torch.Tensor, np.ndarray]:
        """The channel positions of the reshape chain's input, replayed through the chain up to ``node``, and
        that input's label map."""
        inputs = edges(node)
        if len(inputs) != 1:
            raise NotFollowed(f"{label(node)} reshapes more than the unit's channels")
        src, src_nr, _ = inputs[0]
        func, args, kwargs, shape = record.shapes[node.grad_fn]
        if src.grad_fn in record.shapes and map_of(src, src_nr) is None:
            pos, base = _positions(src)
        else:
            base = channel_map(src, src_nr)
            if len(shape) < 2 or shape[1] != len(base):
                raise NotFollowed(f"{label(node)} reshapes a tensor whose channels are not along dim 1")
            pos = torch.arange(len(base)).view(1, -1, *([1] * (len(shape) - 2))).expand(shape).contiguous()
        if tuple(pos.shape) != tuple(shape):
            raise NotFollowed(f"could not replay {label(node)}")
        return func(pos, *args, **kwargs), base

    def _reshaped(node: Any) -> np.ndarray | None:
        pos, base = _positions(node)
        if pos.ndim == 2:  # a flatten to features (before a Linear): each channel's features must be contiguous
            features = pos[0]
            size = len(features) // max(len(base), 1)
            if not bool((pos == features).all()) or size * len(base) != len(features) or not torch.equal(
                    features, torch.arange(len(base)).repeat_interleave(size)):
                raise NotFollowed(f"{label(node)} flattens the channels other than channel by channel")
            flattened[id(node)] = size
            return base[features.numpy()]
        if pos.ndim != 4:
            return None
        flat = pos.movedim(1, 0).reshape(pos.shape[1], -1)
        if not bool((flat == flat[:, :1]).all()):
            raise NotFollowed(f"{label(node)} mixes channels with positions")
        perm = flat[:, 0].numpy()
        g = _shuffle_groups(perm) if len(perm) == len(base) else 0
        if g == 0:
            raise NotFollowed(f"{label(node)} reorders the channels other than as a channel shuffle")
        if g > 1:
            if np.any(base < 0):
                raise NotFollowed(f"a channel shuffle ({label(node)}) of the unit's channels with others")
            per = len(base) // g
            for j in range(1, g):  # the pruned shuffle is the masked one iff every group keeps the same positions
                ties.union(base[j * per:(j + 1) * per], base[:per])
        return base[perm]

    def _features_per_channel(src: Any) -> int:
        """Features per channel of the flatten ``src`` comes from (through per-element ops)."""
        while id(src) not in flattened:
            if _spatial_mean(src) is False:  # x.mean((2, 3)): (N, C), one feature per channel
                return 1
            if not per_channel(src) or len(src.inputs) != 1:
                raise NotFollowed(f"a Linear reads the unit's channels other than through a flatten ({label(src)})")
            src = src.inputs[0]
        return flattened[id(src)]

    def _part(node: Any, nr: int, m: np.ndarray) -> np.ndarray:
        fn = node.grad_fn
        if kind(node) == "SplitWithSizesBackward0":
            raise NotFollowed(f"goes through a split with literal sizes {list(fn._saved_split_sizes)} (they no "
                              "longer sum to the channel count once channels are removed)")
        if kind(node) != "SplitBackward0" or fn not in record.chunks:
            raise NotFollowed(f"goes through a split or slice ({kind(node)}; only `chunk` is followed)")
        chunks, dim = record.chunks[fn]
        width, size = int(fn._saved_self_sym_sizes[1]), int(fn._saved_split_size)
        if dim != 1 or width != len(m) or np.any(m < 0):
            raise NotFollowed("goes through a chunk of the unit's channels with others")
        if chunks < 1 or width % chunks or size != width // chunks:
            raise NotFollowed(f"goes through a chunk into unequal parts ({width} channels in {chunks})")
        parts = [m[j * size:(j + 1) * size] for j in range(chunks)]
        if shuffled:  # the exact condition, equal counts per part, is kept as a balance between units
            chunk_parts[id(node)] = parts
        else:  # every part keeps the same positions (so as many channels)
            for part in parts[1:]:
                ties.union(part, parts[0])
        return parts[nr]

    for node in reach.values():  # every tensor on the way: its map (raises where nothing is followed)
        if node.type != OPTYPE.SPLIT:
            map_of(node, 0)
    inputs, features = {}, {}
    for node in consumers.values():  # what each consumer reads (a chunk's part may go straight to a conv)
        linear = node.type == OPTYPE.LINEAR
        (src, nr, k), *more = edges(node) or [(None, 0, 1)]
        if src is None or more or (k != 0 and not linear):
            raise NotFollowed(f"{names.get(node.module, node.module)} reads these channels other than as its input")
        m = channel_map(src, nr)
        if linear:  # read per channel through the flatten before it: g features per channel
            features[id(node)] = size = _features_per_channel(src)
            if len(m) != node.module.in_features:
                raise NotFollowed(f"{names[node.module]} reads the channels other than as its features")
            m = m[::size]
        inputs[id(node)] = m
    return LabelTrace(dg, root, names, max_features, root_labels, reach, consumers, inputs, maps, ties,
                      chunk_parts, shuffled, features)
