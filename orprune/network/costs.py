"""MACs and parameter counts of a network as polynomials in the keep counts of its units.

Every tensor's channel count is affine in the keep counts: ``c(k) = c_0 + sum_u m_u k_u`` where
``m_u`` is how many of its channels (or flattened features) each channel of unit ``u`` becomes.
torch-pruning's counter (``tp.utils.count_ops_and_params``) charges each module a product of at most
two such counts times a fixed spatial factor, so the whole network's cost is

.. math:: \\mathrm{cost}(k) = c_0 + \\sum_u a_u k_u + \\sum_{(u, v)} b_{uv} k_u k_v,

the :class:`orprune.network.cost_model.CostModel` of the global allocation. Per module, with ``P`` output
positions per image:

* conv, ``groups = 1``: ``kh kw P c_in(k) c_out(k)`` (+ ``P c_out(k)`` for a bias); depthwise:
  ``kh kw P c(k)``; params ``kh kw c_in c_out / groups`` (+ ``c_out``);
* Linear: ``R c_in(k) c_out(k) + c_out(k) / batch`` (``R`` rows per sample; torch-pruning does not
  multiply the bias by the batch), params ``c_in c_out + c_out``;
* BatchNorm / InstanceNorm / GroupNorm: ``2 P c(k)`` when affine, params ``2 c(k)``; a LayerNorm over
  the channels (``normalized_shape = (C,)``): ``2 R c(k)`` when affine (``R`` rows per sample), params
  ``2 c(k)`` (``formulations/channel_norms.md``);
* activations and pooling: ``P c(k)`` (their output resp. input elements); Upsample: the
  elements of one output sample, ``P c(k) / batch``.

Functional ops (``F.relu``, ``torch.flatten``, residual adds) cost nothing, as in torch-pruning.
The derivation is in ``formulations/network_costs.md``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.ops import OPTYPE
from torch_pruning.utils import op_counter

from orprune.network.chunks import ChunkRecorder, TracedFamily, trace_family
from orprune.network.cost_model import CostModel
from orprune.network.graph import PruningGraph, build_dependency_graph, unit_group

__all__ = ["NetworkCosts", "count_macs_params", "network_costs"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
# Counted by torch-pruning as elements of the output (activations) or the input (pooling).
_ACTIVATIONS = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU)
_POOLS = (
    nn.MaxPool1d, nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool3d,
)


@dataclass(frozen=True)
class NetworkCosts:
    """Cost models of a network over its units.

    Attributes
    ----------
    macs : CostModel
        Multiply-accumulates per sample, as ``tp.utils.count_ops_and_params`` counts them.
    params : CostModel
        Number of parameters.
    n_channels : mapping unit -> int
        Channels of each unit in the unpruned model.
    """

    macs: CostModel
    params: CostModel
    n_channels: Mapping[str, int]

    def evaluate(self, keep: Mapping[str, float] | None = None) -> dict[str, float]:
        """``{"macs": ..., "params": ...}`` at ``keep`` (unit -> count; missing units keep all)."""
        counts = dict(self.n_channels)
        counts.update(keep or {})
        return {"macs": self.macs.evaluate(counts), "params": self.params.evaluate(counts)}


class _Affine:
    """``const + sum_u coef[u] k_u``."""

    def __init__(self, const: float, coef: Mapping[str, float] | None = None):
        self.const, self.coef = float(const), dict(coef or {})

    @property
    def constant(self) -> bool:
        return not self.coef


class _Poly:
    """Accumulates a cost of degree <= 2 in the keep counts."""

    def __init__(self, order: Mapping[str, int]):
        self.const, self.order = 0.0, order
        self.lin: dict[str, float] = defaultdict(float)
        self.bil: dict[tuple[str, str], float] = defaultdict(float)

    def add(self, a: _Affine, scale: float = 1.0) -> None:
        self.const += scale * a.const
        for u, c in a.coef.items():
            self.lin[u] += scale * c

    def add_product(self, a: _Affine, b: _Affine, scale: float = 1.0) -> None:
        self.const += scale * a.const * b.const
        for u, c in a.coef.items():
            self.lin[u] += scale * c * b.const
        for v, c in b.coef.items():
            self.lin[v] += scale * a.const * c
        for u, cu in a.coef.items():
            for v, cv in b.coef.items():
                key = (u, v) if self.order[u] <= self.order[v] else (v, u)
                self.bil[key] += scale * cu * cv

    def model(self) -> CostModel:
        return CostModel(
            constant=self.const,
            linear={u: c for u, c in self.lin.items() if c != 0.0},
            bilinear={k: c for k, c in self.bil.items() if c != 0.0},
        )


class _Channels:
    """Channel counts of every node of the dependency graph as affine functions of keep counts."""

    def __init__(self, dg: Any, model: nn.Module, graph: PruningGraph, record: ChunkRecorder | None = None):
        # node -> unit -> (multiplicity on the output side, on the input side)
        self.out: dict[Any, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.inp: dict[Any, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.n = graph.n_channels
        self.families: dict[str, TracedFamily] = {}
        for unit in graph.units:
            if unit.traced:  # through a chunk or shuffle: orprune's own maps (torch-pruning's group is wrong there)
                self._traced(dg, model, unit, record)
                continue
            group = unit_group(dg, model, unit, range(unit.n_channels))
            for item in group.items:
                node = item.dep.target
                side = self.out if dg.is_out_channel_pruning_fn(item.dep.handler) else self.inp
                side[node][unit.name] += len(item.idxs) / unit.n_channels
        self.by_grad_fn = {n.grad_fn: n for n in dg.module2node.values() if n.grad_fn is not None}
        self.nodes = dg.module2node

    def _traced(self, dg: Any, model: nn.Module, unit: Any, record: ChunkRecorder | None) -> None:
        if unit.root not in self.families:  # a ShuffleNetV2 stage's units come from one trace
            names = {m: n for n, m in model.named_modules()}
            try:
                self.families[unit.root] = trace_family(dg, model.get_submodule(unit.root), names,
                                                        record or ChunkRecorder(), set(), set(), 1 << 62, {},
                                                        frozenset())
            except ValueError as exc:
                raise ValueError(f"unit {unit.name!r} no longer traces through its chunk or shuffle: {exc}") from exc
        widths = self.families[unit.root].widths.get(unit.name)
        if widths is None:
            raise ValueError(f"unit {unit.name!r} is not among the units its root's trace gives now")
        for node, width in widths.items():
            self.out[node][unit.name] += width
        for consumer in unit.consumers:  # a Linear's inputs are features: group_size per channel
            per = consumer.group_size if consumer.kind == "linear" else 1
            self.inp[dg.module2node[model.get_submodule(consumer.name)]][unit.name] += \
                consumer.input_channels.size * per / unit.n_channels

    def _affine(self, full: int, mult: Mapping[str, float]) -> _Affine:
        return _Affine(full - sum(m * self.n[u] for u, m in mult.items()), mult)

    def out_of(self, node: Any, full: int) -> _Affine:
        return self._affine(full, self.out.get(node, {}))

    def in_of(self, node: Any, full: int) -> _Affine:
        """Input channels of a conv (groups=1) or Linear node; per-channel modules (BN, depthwise
        convs, element-wise ops) have one pruning function for both sides, use :meth:`out_of`."""
        return self._affine(full, self.inp.get(node, {}))


def _recorder(calls: list[tuple[nn.Module, tuple, tuple, Any]], batch: list[int]) -> Any:
    """A context manager factory for ``build_dependency_graph(during_forward=...)`` that records
    (module, input shapes, output shape, output grad_fn) of every call of a module torch-pruning
    counts, and the batch size as torch-pruning's counter sees it (first positional input)."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        calls.append((module, shapes, tuple(out.shape), getattr(out, "grad_fn", None)))

    def batch_hook(module: nn.Module, args: tuple, output: Any) -> None:
        batch.append(len(args[0]) if args else 1)

    @contextlib.contextmanager
    def during_forward(model: nn.Module) -> Iterator[None]:
        handles = [model.register_forward_hook(batch_hook)]
        handles += [m.register_forward_hook(hook) for m in model.modules()
                    if type(m) in op_counter.MODULES_MAPPING]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    return during_forward


def network_costs(model: nn.Module, graph: PruningGraph, example_inputs: Any) -> NetworkCosts:
    """MACs and params of ``model`` as cost models over the units of ``graph``.

    Parameters
    ----------
    model : nn.Module
        The unpruned model ``graph`` was found on (not modified).
    graph : PruningGraph
        From :func:`orprune.network.graph.find_groups`; excluded groups count as constants.
    example_inputs : Tensor, tuple or dict
        The inputs torch-pruning's counter would get: the spatial sizes, and the batch size that
        divides the Linear bias term, come from them.

    Returns
    -------
    NetworkCosts
        ``macs.evaluate(keep)`` equals ``tp.utils.count_ops_and_params(pruned, example_inputs)[0]``
        for the model pruned to ``keep`` through the units' dependency groups, ``params`` its second
        value.
    """
    if not isinstance(graph, PruningGraph):
        raise ValueError(f"`graph` must be a PruningGraph from `find_groups`, got {type(graph).__name__}.")
    calls: list[tuple[nn.Module, tuple, tuple, Any]] = []
    batches: list[int] = []
    record, recorder = ChunkRecorder(), _recorder(calls, batches)

    @contextlib.contextmanager
    def during_forward(m: nn.Module) -> Iterator[None]:
        with recorder(m), record:
            yield

    dg, _ = build_dependency_graph(model, example_inputs, during_forward=during_forward)
    channels = _Channels(dg, model, graph, record)
    order = {u: i for i, u in enumerate(graph.names)}
    macs, params = _Poly(order), _Poly(order)
    batch = batches[0] if batches else 1
    loose: set[str] = set()
    names = {m: n for n, m in model.named_modules()}
    for module, in_shapes, out_shape, grad_fn in calls:
        node = channels.nodes.get(module) or channels.by_grad_fn.get(grad_fn)
        if not _add_macs(macs, module, node, in_shapes, out_shape, batch, channels) and node is not None:
            if node in channels.out or node in channels.inp:
                loose.add(names.get(module, type(module).__name__))
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own and not _add_params(params, module, own, channels.nodes.get(module), channels):
            node = channels.nodes.get(module)
            if node is not None and (node in channels.out or node in channels.inp):
                loose.add(names.get(module, type(module).__name__))
    if loose:
        warnings.warn(
            f"the costs of {sorted(loose)} are counted as constants although their channels are pruned.",
            UserWarning,
            stacklevel=2,
        )
    return NetworkCosts(macs.model(), params.model(), dict(graph.n_channels))


def _add_macs(poly: _Poly, module: nn.Module, node: Any, in_shapes: tuple, out_shape: tuple,
              batch: int, ch: _Channels) -> bool:
    """Add one call's MACs; ``False`` when the module's cost is counted as a constant."""
    if isinstance(module, nn.modules.conv._ConvNd):
        positions = math.prod(out_shape[2:]) * out_shape[0] / batch
        kernel = math.prod(module.kernel_size)
        c_out = ch.out_of(node, module.out_channels)
        depthwise = node is not None and node.type == OPTYPE.DEPTHWISE_CONV
        if depthwise:
            poly.add(c_out, kernel * positions)
        else:  # grouped convs keep their group count: in * out / groups products per position
            poly.add_product(ch.in_of(node, module.in_channels), c_out, kernel * positions / module.groups)
        if module.bias is not None:
            poly.add(c_out, positions)
        return True
    if isinstance(module, nn.Linear):
        rows = math.prod(in_shapes[0][:-1]) / batch
        c_out = ch.out_of(node, module.out_features)
        poly.add_product(ch.in_of(node, module.in_features), c_out, rows)
        if module.bias is not None:
            poly.add(c_out, 1.0 / batch)
        return True
    if isinstance(module, _NORMS + _POOLS + _ACTIVATIONS):
        shape = in_shapes[0] if isinstance(module, _NORMS + _POOLS) else out_shape
        factor = 2.0 if isinstance(module, _NORMS) and module.affine else 1.0
        if len(shape) < 2:
            poly.add(_Affine(math.prod(shape) * factor / batch))
            return False
        per_channel = math.prod(shape) / shape[1] / batch
        poly.add(ch.out_of(node, shape[1]), factor * per_channel)
        return True
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and node is not None:
        # torch-pruning: the input's elements (twice when affine), the channels in the last dimension
        width = module.normalized_shape[0]
        factor = 2.0 if module.elementwise_affine else 1.0
        poly.add(ch.out_of(node, width), factor * math.prod(in_shapes[0]) / width / batch)
        return True
    if isinstance(module, nn.Upsample) and len(out_shape) > 2:
        # torch-pruning counts the elements of the first sample only, once per call
        poly.add(ch.out_of(node, out_shape[1]), math.prod(out_shape[2:]) / batch)
        return True
    # a LayerNorm over more than the channels, RNNs, attention: torch-pruning's own formula, unpruned
    counter = op_counter.MODULES_MAPPING[type(module)]
    module.__flops__ = 0
    try:
        fake_in = tuple(torch.zeros(s) for s in in_shapes)
        counter(module, fake_in, torch.zeros(out_shape))
        poly.add(_Affine(module.__flops__ / batch))
    except Exception:  # a counter that needs real tensors: count nothing rather than guess
        pass
    finally:
        del module.__flops__
    return False


def _add_params(poly: _Poly, module: nn.Module, own: list[nn.Parameter], node: Any, ch: _Channels) -> bool:
    """Add a module's own parameters; ``False`` when counted as a constant."""
    names = {id(p): n for n, p in module.named_parameters(recurse=False)}
    if isinstance(module, nn.modules.conv._ConvNd) and node is not None:
        c_out = ch.out_of(node, module.out_channels)
        kernel = math.prod(module.kernel_size)
        for p in own:
            if names[id(p)] == "bias":
                poly.add(c_out)
            elif node.type == OPTYPE.DEPTHWISE_CONV:
                poly.add(c_out, kernel)
            else:
                poly.add_product(ch.in_of(node, module.in_channels), c_out, kernel / module.groups)
        return True
    if isinstance(module, nn.Linear) and node is not None:
        c_out = ch.out_of(node, module.out_features)
        for p in own:
            if names[id(p)] == "bias":
                poly.add(c_out)
            else:
                poly.add_product(ch.in_of(node, module.in_features), c_out)
        return True
    per_channel = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
    channel_ln = isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
    if (isinstance(module, per_channel) or channel_ln) and node is not None:
        for p in own:
            poly.add(ch.out_of(node, p.shape[0]))
        return True
    for p in own:
        poly.add(_Affine(p.numel()))
    return False


def count_macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """MACs and parameters as torch-pruning counts them (the referee for every budget)."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)
