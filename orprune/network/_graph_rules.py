"""Rules of :func:`orprune.network.graph.find_groups` about single nodes of torch-pruning's graph: how a
consumer reads a unit's channels, which operands of an element-wise op are outside the graph, which
BatchNorms can take a reconstructed bias."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch_pruning as tp
from torch import nn
from torch_pruning.ops import OPTYPE

# Node types that only pass channels through, one to one.
_PASS_THROUGH = {OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE}
# Element-wise arithmetic: a per-channel parameter operand is sliced with the channels.
_ARITHMETIC = {"MulBackward0", "AddBackward0", "SubBackward0", "DivBackward0"}


def _pruning_fn(module: nn.Module) -> Callable:
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _consumer_layout(
    module: nn.Module, idxs: list[int], root_idxs: list[int], n: int
) -> tuple[int, tuple[int, ...] | None, int] | None:
    """How a consumer reads the unit's ``n`` channels: ``(g, channels, n_inputs)``.

    Channel ``c`` must be read at inputs ``[j*g, (j+1)*g)`` for one input channel ``j = channels[c]``,
    increasing in ``c``, out of ``n_inputs = n_in / g``; ``channels`` is None when the unit's channels
    are all the inputs, in order. None when the consumer reads the channels otherwise (out of order,
    twice, or partly).
    """
    n_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    idxs_a, root_a = np.asarray(idxs), np.asarray(root_idxs)
    if idxs_a.size == 0 or idxs_a.size % n:
        return None
    g = idxs_a.size // n
    if n_in % g or (isinstance(module, nn.Conv2d) and g != 1):
        return None
    order = np.lexsort((idxs_a, root_a))
    idxs_a, root_a = idxs_a[order], root_a[order]
    if not np.array_equal(root_a, np.repeat(np.arange(n), g)):
        return None
    runs = idxs_a.reshape(n, g)
    starts = runs[:, 0]
    if not np.array_equal(runs, starts[:, None] + np.arange(g)) or np.any(starts % g):
        return None
    channels = starts // g
    if np.any(np.diff(channels) <= 0):
        return None
    n_inputs = n_in // g
    if n_inputs == n:
        return g, None, n
    return g, tuple(int(c) for c in channels), n_inputs


def _parameter_owners(model: nn.Module) -> dict[int, nn.Module]:
    """``id(parameter) -> module`` for every parameter registered directly on a module."""
    return {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}


def _enclosing_modules(node: Any) -> set[nn.Module]:
    """The modules whose traced output ``node`` feeds through pass-through ops only.

    An op inside a module's ``forward`` (the ``F.batch_norm`` of a fused BatchNorm + activation, the
    ``F.layer_norm`` between two permutes, the ``addmm`` of a Linear applied to a 3-D input) has no
    module of its own: torch-pruning labels it element-wise and maps the module to its output.
    """
    found: set[nn.Module] = set()
    seen, todo = {id(node)}, list(node.outputs)
    while todo:
        nxt = todo.pop()
        if id(nxt) in seen:
            continue
        seen.add(id(nxt))
        if nxt.type in _PASS_THROUGH:
            todo.extend(nxt.outputs)
        else:
            found.add(nxt.module)
    return found


def _has_outside_operand(node: Any, owners: Mapping[int, nn.Module], sliced: frozenset[int] = frozenset()) -> bool:
    """Whether an element-wise op also reads a tensor the dependency graph does not track: a model
    input (residual add to the input), a constant or buffer, or the parameter of a functional
    layer (``F.conv2d``). Slicing channels would break that operand.

    A parameter of the module whose own forward contains the op (found by
    :func:`_enclosing_modules`) is not outside: torch-pruning slices a module's own weight and bias
    with it (a fused BatchNorm's ``F.batch_norm``, a channels-last LayerNorm, a Linear on a 3-D input).
    Nor is a per-channel parameter of no module (``sliced``: a layer scale, a learned offset) multiplied
    or added element-wise: torch-pruning slices it with the channels (its "unwrapped parameters").
    """
    grad_fn = node.grad_fn
    if grad_fn is None:
        return False
    operands = [f for f, _ in grad_fn.next_functions]
    if len(operands) < 2:
        return False
    enclosing: set[nn.Module] | None = None
    for f in operands:
        if f is None:
            return True
        if type(f).__name__ != "AccumulateGrad":
            continue
        owner = owners.get(id(f.variable))
        if id(f.variable) in sliced and type(grad_fn).__name__ in _ARITHMETIC:
            continue
        if enclosing is None:
            enclosing = _enclosing_modules(node)
        if owner is None or owner not in enclosing:
            return True
    return False


def _following_norm(
    dg: tp.DependencyGraph, module: nn.Module, names: Mapping[nn.Module, str]
) -> str | None:
    """The BatchNorm that alone reads ``module``'s output (and reads nothing else), if any."""
    node = dg.module2node[module]
    if len(node.outputs) != 1:
        return None
    nxt = node.outputs[0]
    tracks = getattr(nxt.module, "track_running_stats", False)
    if nxt.type != OPTYPE.BN or len(nxt.inputs) != 1 or not tracks:
        return None
    return names.get(nxt.module)


def _norms_through_concat(
    dg: tp.DependencyGraph, module: nn.Module, names: Mapping[nn.Module, str]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The BatchNorms reading ``module``'s output through concatenations only (DenseNet), with the
    BatchNorm channel of each output channel; empty unless every reader is such a BatchNorm."""
    node = dg.module2node[module]
    if not any(o.type == OPTYPE.CONCAT for o in node.outputs):
        return ()
    readers, todo, seen = [], list(node.outputs), set()
    while todo:
        nxt = todo.pop()
        if id(nxt) in seen:
            continue
        seen.add(id(nxt))
        if nxt.type == OPTYPE.CONCAT:
            todo.extend(nxt.outputs)
            continue
        if (nxt.type != OPTYPE.BN or nxt.module not in names or len(nxt.inputs) != 1
                or getattr(nxt.module, "running_mean", None) is None):
            return ()
        readers.append(nxt.module)
    n_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    group = dg.get_pruning_group(module, _pruning_fn(module), idxs=list(range(n_out)))
    out = []
    for bn in readers:
        items = [it for it in group.items if it.dep.target.module is bn]
        if len(items) != 1 or sorted(items[0].root_idxs) != list(range(n_out)):
            return ()
        order = np.argsort(np.asarray(items[0].root_idxs))
        out.append((names[bn], tuple(int(i) for i in np.asarray(items[0].idxs)[order])))
    return tuple(out)


def _channel_norm(
    module: nn.Module, idxs: list[int], root_idxs: list[int], n: int
) -> tuple[int, tuple[int, ...]] | str:
    """How a LayerNorm / GroupNorm on a unit's ``n`` root channels is sliced with them: ``(tie, channels)``,
    the groups every group must lose channels from alike (1 for a LayerNorm) and the norm's channel of each
    root channel; or why it cannot be (``formulations/channel_norms.md``)."""
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return f"LayerNorm over the shape {tuple(module.normalized_shape)}, not over the channels alone"
        width = module.normalized_shape[0]
    elif isinstance(module, nn.GroupNorm):
        width = module.num_channels
    else:
        return f"{type(module).__name__} is not a LayerNorm or a GroupNorm"
    order = np.argsort(np.asarray(root_idxs), kind="stable")
    channels = tuple(int(i) for i in np.asarray(idxs)[order])
    if len(channels) != n or sorted(np.asarray(root_idxs).tolist()) != list(range(n)):
        return "a norm reads these channels partly or twice"
    if not isinstance(module, nn.GroupNorm) or module.num_groups == 1:
        return 1, channels
    if width != n or channels != tuple(range(n)):  # the groups are the root's channels in order
        return "a GroupNorm reads these channels through a concatenation or out of order"
    return module.num_groups, channels
