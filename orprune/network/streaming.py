"""The whole sequential refit in one forward pass: the model traced with ``torch.fx`` and run node by node over
every calibration batch at once.

The sequential refit (:func:`orprune.network.calibration.collect_statistics` with a :class:`TargetCache`
reference, once per consumer) runs the masked model over all batches up to each consumer's depth: O(depth^2)
layer evaluations. Here each node of the traced graph is evaluated for every batch (one value per batch, freed
after the node's last user), in the order of the forward pass; at a consumer to refit, its statistics come from
the values it reads, ``refit(name, accumulator)`` solves and writes the new weights into the model, and only then
is the node's output computed, with the new weights: every later consumer sees inputs from the network with all
earlier consumers refitted, exactly as in its own pass.

A residual target's taps (:mod:`orprune.network.residual_targets`) are values of the graph. A tap computed
before the consumer is read from the held values. A tap the forward pass computes after the consumer (a
projection shortcut) is computed for the consumer alone, batch by batch, from the held values and the current
weights (its own consumers not refitted yet, as in the consumer's own pass), then dropped; the pass computes it
again when it gets there, after those consumers' refits. The statistics are therefore those of the
per-consumer passes, bit for bit (same positions and targets from the cache, same accumulation order).

Memory: one pass holds, at each node, the live values of every batch. Under a ``max_bytes`` limit the values of
all batches are kept only at a *checkpoint* (the last consumer where they fitted); a consumer beyond is reached by
running each batch alone from the checkpoint (its values cloned, so in-place ops leave it intact), with the weights
already refitted, which gives the same values again. With no room at all the checkpoint stays at the inputs: one
pass per consumer, the O(depth^2) of the per-consumer passes.

:func:`stream_refit` raises :class:`StreamUnsupported` before changing anything when a model does not qualify
(fx cannot trace it, a consumer or tapped module runs more than once, the node-by-node run of the first batch
does not reproduce the model's output bit for bit); the caller then runs one pass per consumer.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from orprune.layer.problem import StatisticsAccumulator
from orprune.network._consumer_stream import ConsumerStream, TargetCache
from orprune.network.calibration import _batch_input, _n_positions, _to
from orprune.network.graph import call_model
from orprune.network.residual_targets import TargetOffset

__all__ = ["StreamStats", "StreamUnsupported", "stream_refit"]

_log = logging.getLogger(__name__)

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}


class StreamUnsupported(Exception):
    """The model cannot be streamed (the message says why): refit it with one pass per consumer."""


@dataclass(frozen=True)
class StreamStats:
    """What :func:`stream_refit` did: the peak bytes of activations it held (measured), the peak one pass of all
    batches would hold (estimated from the first batch), node evaluations in forward passes (1.0: one pass; more
    where consumers were recomputed from an earlier checkpoint to stay within ``max_bytes``), and how many
    consumers the checkpoint moved to."""

    peak_bytes: int
    estimated_bytes: int
    passes: float
    checkpoints: int


@dataclass
class _Plan:
    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    consumers: dict[fx.Node, str]  # call_module node -> consumer name
    taps: dict[str, list[fx.Node]]  # consumer -> the nodes whose values its offset taps
    stop: int  # index of the last node the refit needs
    frees: dict[int, list[fx.Node]]  # node index -> nodes whose values are dead after it
    placeholders: list[fx.Node]


def _plan(model: nn.Module, consumers: Sequence[str], offsets: Mapping[str, TargetOffset]) -> _Plan:
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # any tracing failure: one pass per consumer
        raise StreamUnsupported(f"torch.fx cannot trace {type(model).__name__} ({exc})") from exc
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    calls: dict[int, list[fx.Node]] = {}  # id(module) -> its call nodes
    for node in nodes:
        if node.op == "call_module":
            calls.setdefault(id(modules[node.target]), []).append(node)
    called = {id(modules[n.target]) for n in nodes if n.op == "call_module"}
    hooked = [name for name, m in modules.items() if id(m) not in called and (m._forward_hooks or m._forward_pre_hooks)]
    if hooked:
        raise StreamUnsupported(f"modules {hooked[:3]} have hooks but are not leaves of the traced graph")
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        raise StreamUnsupported("global module hooks are registered")

    def call_of(name: str, what: str) -> fx.Node:
        found = calls.get(id(modules.get(name)), []) if name in modules else []
        if len(found) != 1:
            raise StreamUnsupported(f"{what} {name!r} is called {len(found)} times in the traced graph")
        return found[0]

    consumer_nodes = {call_of(n, "consumer"): n for n in consumers}
    ranked = sorted(consumer_nodes, key=index.__getitem__)
    if [consumer_nodes[n] for n in ranked] != list(consumers):
        raise StreamUnsupported("the traced graph runs the consumers in another order than the forward pass")
    for node, name in consumer_nodes.items():
        if not node.args or not isinstance(node.args[0], fx.Node) or node.kwargs:
            raise StreamUnsupported(f"consumer {name!r} is not called with one positional input")
    taps: dict[str, list[fx.Node]] = {}
    for name, offset in offsets.items():
        taps[name] = []
        for tap in offset.taps:
            node = call_of(tap.module, "tapped module")
            if tap.port == "input":
                if not node.args or not isinstance(node.args[0], fx.Node):
                    raise StreamUnsupported(f"tapped module {tap.module!r} has no positional input node")
                node = node.args[0]
            taps[name].append(node)
    stop = max(index[n] for n in consumer_nodes)
    stop = max([stop] + [index[t] for ts in taps.values() for t in ts])
    last: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes[: stop + 1]):
        for arg in node.all_input_nodes:
            last[arg] = max(last.get(arg, -1), i)
    for node, name in consumer_nodes.items():  # a consumer's taps stay until the consumer is refitted
        for t in taps.get(name, ()):
            last[t] = max(last.get(t, -1), index[node])
    frees: dict[int, list[fx.Node]] = {}
    for node, i in last.items():
        frees.setdefault(i, []).append(node)
    for i, node in enumerate(nodes[: stop + 1]):  # a value nothing reads is dropped at once
        if node not in last:
            frees.setdefault(i, []).append(node)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if any(str(p.target).startswith("*") for p in placeholders):
        raise StreamUnsupported("the forward method takes *args or **kwargs")
    return _Plan(nodes, index, consumer_nodes, taps, stop, frees, placeholders)


def _placeholder_values(plan: _Plan, inputs: Any) -> list[Any]:
    """What each placeholder gets when :func:`orprune.network.graph.call_model` calls the model with ``inputs``."""
    given: dict[str, Any] = {}
    if isinstance(inputs, Mapping):
        given = dict(inputs)
    else:
        positional = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        if len(positional) > len(plan.placeholders):
            raise StreamUnsupported("a batch has more inputs than the forward method's arguments")
        given = {str(p.target): v for p, v in zip(plan.placeholders, positional)}
    values = []
    for p in plan.placeholders:
        if str(p.target) in given:
            values.append(given[str(p.target)])
        elif p.args:
            values.append(p.args[0])
        else:
            raise StreamUnsupported(f"the forward argument {p.target!r} gets no value")
    return values


def _fetch_attr(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _run(model: nn.Module, node: fx.Node, fetch: Callable[[fx.Node], Any]) -> Any:
    """One node's value, its inputs from ``fetch``."""
    if node.op == "get_attr":
        return _fetch_attr(model, str(node.target))
    args = fx.node.map_arg(node.args, fetch)
    kwargs = fx.node.map_arg(node.kwargs, fetch)
    if node.op == "call_module":
        return model.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        obj, *rest = args
        return getattr(obj, str(node.target))(*rest, **kwargs)
    raise StreamUnsupported(f"node {node.name} has op {node.op!r}")


def _bytes(states: Iterable[Mapping[fx.Node, Any] | None], inputs: Any = ()) -> int:
    """Bytes of the tensors held in ``states``, each storage counted once (in-place ops share one), but for those
    of ``inputs`` (the calibration batches, held anyway)."""
    given = {leaf.untyped_storage().data_ptr() for leaf in tree_flatten(inputs)[0] if torch.is_tensor(leaf)}
    seen: dict[int, int] = {}
    for state in states:
        for value in (state or {}).values():
            for leaf in tree_flatten(value)[0]:
                if torch.is_tensor(leaf) and leaf.device.type != "meta":
                    storage = leaf.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(n for ptr, n in seen.items() if ptr not in given)


def _clone(value: Any) -> Any:
    return tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, value)


class _Recompute(dict):
    """One batch's values while it is recomputed from a checkpoint: a checkpoint value is cloned when first read
    (an in-place op of the recomputation must not change the checkpoint)."""

    def __init__(self, checkpoint: Mapping[fx.Node, Any]):
        super().__init__()
        self.checkpoint = checkpoint

    def __missing__(self, node: fx.Node) -> Any:
        value = self[node] = _clone(self.checkpoint[node])
        return value


def _numel(inputs: Any) -> int:
    return sum(leaf.numel() for leaf in tree_flatten(inputs)[0] if torch.is_tensor(leaf))


def _check_first_batch(model: nn.Module, plan: _Plan, inputs: Any) -> list[int]:
    """Run the whole graph node by node on one batch: its output must equal the model's, bit for bit. Returns the
    bytes held after each node (its dead inputs freed) up to the refit's last one."""
    values: dict[fx.Node, Any] = dict(zip(plan.placeholders, _placeholder_values(plan, inputs)))
    live, out = [0] * (plan.stop + 1), None
    last = {arg: i for i, node in enumerate(plan.nodes) for arg in node.all_input_nodes}
    for i, node in enumerate(plan.nodes):
        if node.op == "output":
            out = fx.node.map_arg(node.args[0], values.__getitem__)
            break
        if node.op != "placeholder":
            values[node] = _run(model, node, values.__getitem__)
        for arg in node.all_input_nodes:
            if last.get(arg) == i:
                values.pop(arg, None)
        if i <= plan.stop:
            live[i] = _bytes([values], inputs)
    expected = call_model(model, inputs)
    got, want = tree_flatten(out)[0], tree_flatten(expected)[0]
    same = len(got) == len(want) and all(
        (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b))
        or (not torch.is_tensor(a) and not torch.is_tensor(b) and a == b) for a, b in zip(got, want))
    if not same:
        raise StreamUnsupported("the traced graph does not reproduce the model's output on the first batch")
    return live


def stream_refit(
    model: nn.Module,
    consumers: Sequence[str],
    batches: Sequence[Any],
    reference: TargetCache,
    refit: Callable[[str, StatisticsAccumulator], None],
    *,
    offsets: Mapping[str, TargetOffset] | None = None,
    float32: bool = False,
    max_bytes: int | None = None,
) -> StreamStats:
    """Refit ``consumers`` sequentially in one node-by-node pass of ``model`` over all ``batches``.

    Parameters
    ----------
    model : nn.Module
        The masked working model, in eval mode; ``refit`` writes each consumer's new weights into it.
    consumers : sequence of str
        The consumers to refit, in the order the forward pass runs them; each must run once per pass.
    batches : sequence
        The calibration batches ``reference`` was filled from, in the same order.
    reference : TargetCache
        The original model's sampled targets (and tapped rows for ``offsets``).
    refit : callable (name, StatisticsAccumulator) -> None
        Solves one consumer from its statistics and writes the result into ``model``; called in order.
    offsets : mapping str -> TargetOffset, optional
        Residual-target corrections, as for :func:`orprune.network.calibration.collect_statistics`.
    float32 : bool, default False
        Batch products in float32 (``StatisticsAccumulator(float32=True)``).
    max_bytes : int, optional
        Most bytes of activations of all batches to hold at once (estimated from the first batch): where one pass
        would hold more, the values of all batches are kept only at an earlier consumer (a checkpoint) and each
        batch is recomputed from there, alone, up to the consumer to refit (the same values, more node
        evaluations). None: one pass.

    Returns
    -------
    StreamStats

    Raises
    ------
    StreamUnsupported
        Before anything is written into ``model``: the model does not qualify (the message says why).
    """
    offsets = dict(offsets or {})
    batches = list(batches)
    if not batches:
        raise StreamUnsupported("no calibration batch")
    missing = [n for n in consumers if n not in reference] + [n for n in offsets if n not in reference._offsets]
    if missing:
        raise StreamUnsupported(f"the target cache has no rows of {missing}")
    if reference.n_batches != len(batches):
        raise StreamUnsupported(f"the target cache holds {reference.n_batches} batches, not {len(batches)}")
    plan = _plan(model, consumers, offsets)
    if any(n.op == "placeholder" for n in plan.nodes[len(plan.placeholders):]):
        raise StreamUnsupported("the traced graph has placeholders after other nodes")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = [_to(_batch_input(b), device) for b in batches]
    with torch.no_grad():
        try:
            live = _check_first_batch(model, plan, inputs[0])
        except StreamUnsupported:
            raise
        except Exception as exc:
            raise StreamUnsupported(f"the traced graph fails on the first batch ({type(exc).__name__}: {exc})") from exc
        scale = sum(_numel(x) for x in inputs) / max(_numel(inputs[0]), 1)
        stream = _Stream(model, plan, inputs, reference, dict(offsets), bool(float32))
        stream.run(refit, [v * scale for v in live], max_bytes)
    last = max(plan.index[n] for n in plan.consumers)
    evaluated = sum(1 for n in plan.nodes[: last + 1] if n.op != "placeholder")
    at_consumers = [max(live[plan.index[n] - 1], live[plan.index[n]]) for n in plan.consumers]
    return StreamStats(peak_bytes=stream.peak, estimated_bytes=int(max(at_consumers) * scale),
                       passes=stream.evaluations / max(evaluated * len(inputs), 1), checkpoints=stream.checkpoints)


class _Stream:
    """The pass: per batch, the values of a checkpoint (the nodes alive after it); at each consumer, every batch
    runs from the checkpoint to the consumer's input, the consumer is refitted, and the checkpoint moves to the
    consumer when the values of all batches fit in ``max_bytes`` (else the next consumer runs from the old one)."""

    def __init__(self, model: nn.Module, plan: _Plan, inputs: list[Any], reference: TargetCache,
                 offsets: dict[str, TargetOffset], float32: bool):
        self.model, self.plan, self.reference, self.offsets, self.float32 = model, plan, reference, offsets, float32
        self.checkpoint = len(plan.placeholders) - 1
        self.states: list[dict[fx.Node, Any] | None] = [
            dict(zip(plan.placeholders, _placeholder_values(plan, x))) for x in inputs]
        for j in range(self.checkpoint + 1):
            self._free(j, self.states)
        self.inputs = inputs
        self.peak = 0
        self.evaluations = 0
        self.checkpoints = 0

    def _free(self, j: int, states: Iterable[dict[fx.Node, Any] | None]) -> None:
        for state in states:
            for dead in self.plan.frees.get(j, ()):
                if state is not None:
                    state.pop(dead, None)

    def run(self, refit: Callable[[str, StatisticsAccumulator], None], live: list[float],
            max_bytes: int | None) -> None:
        plan = self.plan
        for node in sorted(plan.consumers, key=plan.index.__getitem__):
            i = plan.index[node]
            # moving the checkpoint here holds every batch's values at the consumer's input and output (one batch
            # at a time runs from the checkpoint); else one batch at a time is recomputed and dropped
            keep = max_bytes is None or max(live[i - 1], live[i]) <= max_bytes
            name = plan.consumers[node]
            stream = ConsumerStream(name, self.model.get_submodule(name), None, torch.Generator())
            stream.float32, stream.bias, stream.offset = self.float32, self.reference._bias[name], self.offsets.get(name)
            kept: list[dict[fx.Node, Any]] = []
            checks = []
            for b in range(len(self.states)):
                if keep:  # the batch's checkpoint values become its values at the consumer
                    state, self.states[b] = self.states[b], None
                else:
                    state = _Recompute(self.states[b])
                for j in range(self.checkpoint + 1, i):
                    state[plan.nodes[j]] = _run(self.model, plan.nodes[j], state.__getitem__)
                    self._free(j, [state])
                self.evaluations += i - self.checkpoint - 1
                checks.append(self._record(stream, b, i, node, state))
                if keep:
                    kept.append(state)
                self.peak = max(self.peak, _bytes(self.states + kept + ([] if keep else [state]), self.inputs))
                del state
            if stream.acc is None:
                raise ValueError(f"consumer {name!r} got no calibration rows.")
            refit(name, stream.acc)
            del stream
            if not keep:
                continue
            for state, (n_pos, tap_shapes) in zip(kept, checks):  # the consumer's output with its new weights
                out = state[node] = _run(self.model, node, state.__getitem__)
                if _n_positions(out) != n_pos or any(s != out.shape for s in tap_shapes):
                    raise ValueError(f"consumer {name!r} has output shape {tuple(out.shape)} in `model`, which does "
                                     "not match the target cache or its tapped tensors.")
                self._free(i, [state])
            self.evaluations += len(kept)
            self.states, self.checkpoint = kept, i
            self.checkpoints += 1
            self.peak = max(self.peak, _bytes(self.states, self.inputs))

    def _record(self, stream: ConsumerStream, b: int, position: int, node: fx.Node,
                state: dict[fx.Node, Any]) -> tuple[int, list[torch.Size]]:
        """Batch ``b``'s rows of a consumer (as :func:`collect_statistics` with a cache reference has them).
        Returns the cached rows per sample and the tapped tensors' shapes, to check against the output."""
        stream.begin(b)
        stream.taps = None
        n_pos, idx, rows = self.reference._get(stream)
        x = state[node.args[0]]
        if stream.offset is None:
            stream.update(x, rows, idx)
            return n_pos, []
        tapped = [state[t] if self.plan.index[t] < position else self._lookahead(position, t, state)
                  for t in self.plan.taps[stream.name]]
        model_taps = torch.stack([stream.sample(t, idx).double() for t in tapped]).sum(0)
        diff = self.reference._get_offset(stream).double() - model_taps
        scale = stream.offset.scale
        stream.update(x, rows, idx, diff if scale is None else diff * scale.to(diff))
        return n_pos, [t.shape for t in tapped]

    def _lookahead(self, position: int, target: fx.Node, state: Mapping[fx.Node, Any]) -> Any:
        """The value of ``target`` (after ``position`` in the graph) for one batch from its values and the current
        weights, without changing them (each is cloned where a node reads it)."""
        index = self.plan.index
        needed: set[fx.Node] = set()
        stack = [target]
        while stack:
            node = stack.pop()
            if node not in needed and index[node] > position:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        local: dict[fx.Node, Any] = {}

        def fetch(arg: fx.Node) -> Any:
            return local[arg] if arg in local else _clone(state[arg])

        for node in sorted(needed, key=index.__getitem__):
            local[node] = _run(self.model, node, fetch)
        self.evaluations += len(needed)
        return local[target]
