"""Channel groups of a model, one per prunable channel, from torch-pruning's dependency graph.

torch-pruning's ``DependencyGraph`` returns *dependency groups*: all layers coupled through one channel
dimension, with all their channels. Here each of those is split into *channel groups*, one per root
channel, holding every parameter slice that disappears with that channel.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from orprune.network.graph import build_dependency_graph

__all__ = ["ChannelGroup", "GroupMember", "trace_channel_groups"]

# Modules whose parameters are 1-D per-channel vectors (weight[c], bias[c]).
_PER_CHANNEL = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)


@dataclass(frozen=True)
class GroupMember:
    """One module's share of a channel group.

    Attributes
    ----------
    module : str
        Qualified name of the module in the model (``model.get_submodule(module)``).
    dim : {"out", "in"}
        ``"out"``: output channels of the module (conv filters, Linear rows, normalisation entries,
        depthwise filters); ``"in"``: input slices of a consumer.
    indices : tuple of int
        Indices along that dimension (several for a consumer behind a flatten).
    penalized : bool
        Whether these slices enter the group's weight vector.
    """

    module: str
    dim: str
    indices: tuple[int, ...]
    penalized: bool


@dataclass(frozen=True)
class ChannelGroup:
    """The parameter slices removed together with one channel.

    Attributes
    ----------
    root_module : str
        Name of the root layer of the dependency group (its output channels index the group);
        ``DG.get_pruning_group(model.get_submodule(root_module), ..., [root_channel])`` rebuilds the
        torch-pruning group for removal.
    root_channel : int
        Output channel of ``root_module``.
    dependency_group : int
        Index of the torch-pruning dependency group this channel belongs to.
    members : tuple of GroupMember
        Every parameterised module touched by removing the channel.
    size : int
        Number of weight entries in the penalised vector (each entry counted once).
    """

    root_module: str
    root_channel: int
    dependency_group: int
    members: tuple[GroupMember, ...]
    size: int


# (module name, parameter name) -> list of (channel group id, flat indices into the parameter)
EntryMap = dict[tuple[str, str], list[tuple[int, np.ndarray]]]


def trace_channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_layers: Iterable[nn.Module] = (),
    include_consumers: bool = False,
    root_module_types: tuple[type, ...] = (nn.Conv2d, nn.Linear),
) -> tuple[tuple[ChannelGroup, ...], EntryMap]:
    """Trace ``model`` and return its channel groups and the flat parameter entries of each.

    A dependency group with no consumer (no layer takes its channels as input) feeds the model's
    output, e.g. the classifier's logits; it is skipped, as are groups touching ``ignored_layers``.
    The model is traced in eval mode (so BatchNorm statistics are untouched) and every module's
    training flag restored (:func:`orprune.network.graph.build_dependency_graph`).
    """
    dg, _ = build_dependency_graph(model, example_inputs)
    dep_groups = list(dg.get_all_groups(ignored_layers=list(ignored_layers),
                                        root_module_types=list(root_module_types)))

    names = {m: n for n, m in model.named_modules()}
    flat_cache: dict[tuple[str, str], np.ndarray] = {}
    groups: list[ChannelGroup] = []
    entries: EntryMap = {}
    skipped: set[str] = set()
    for g_idx, dep_group in enumerate(dep_groups):
        items = []
        for item in dep_group.items:
            kind = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            items.append((item.dep.target.module, kind, list(item.idxs),
                          list(getattr(item, "root_idxs", None) or item.idxs)))
        if not any(kind == "in" for _, kind, _, _ in items):
            continue  # nothing consumes these channels: they are model outputs
        for channel in items[0][2]:
            gid = len(groups)
            members: dict[tuple[str, str], tuple[set[int], bool]] = {}
            slices: dict[tuple[str, str], list[np.ndarray]] = {}
            for module, kind, idxs, root_idxs in items:
                own = [i for i, r in zip(idxs, root_idxs) if r == channel]
                if not own:
                    continue
                if not isinstance(module, nn.Module):  # an unwrapped nn.Parameter
                    skipped.add(f"parameter of shape {tuple(module.shape)}")
                    continue
                specs, role = _param_slices(module, kind)
                if specs is None:
                    skipped.add(f"{names.get(module, '?')} ({type(module).__name__}, {kind})")
                    continue
                if not specs:
                    continue
                penalized = role == "out" or include_consumers
                key = (names[module], role)
                prev = members.get(key, (set(), False))
                members[key] = (prev[0] | set(own), prev[1] or penalized)
                if not penalized:
                    continue
                for pname, dim in specs:
                    param = getattr(module, pname)
                    ckey = (names[module], pname)
                    if ckey not in flat_cache:
                        flat_cache[ckey] = np.arange(param.numel()).reshape(tuple(param.shape))
                    slices.setdefault(ckey, []).append(np.take(flat_cache[ckey], own, axis=dim).ravel())
            size = 0
            for ckey, parts in slices.items():
                flat = np.unique(np.concatenate(parts))  # a slice touched by several items counts once
                entries.setdefault(ckey, []).append((gid, flat))
                size += flat.size
            groups.append(ChannelGroup(
                root_module=names[items[0][0]],
                root_channel=int(channel),
                dependency_group=g_idx,
                members=tuple(GroupMember(n, role, tuple(sorted(ix)), pen)
                              for (n, role), (ix, pen) in members.items()),
                size=size,
            ))
    if skipped:
        warnings.warn(
            "SPR leaves out parameters of modules it cannot slice by channel: " + ", ".join(sorted(skipped)),
            stacklevel=3,
        )
    return tuple(groups), entries


def _param_slices(module: nn.Module, kind: str) -> tuple[list[tuple[str, int]] | None, str]:
    """Parameter names and dimensions holding one channel, and the member's role.

    Returns ``(None, kind)`` for a parameterised module this cannot slice, ``([], kind)`` for a module
    without parameters.
    """
    if isinstance(module, _ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if depthwise:  # input and output channels coincide: one filter per channel
            return _present(module, [("weight", 0), ("bias", 0)]), "out"
        if kind == "out":
            if module.transposed and module.groups != 1:
                return None, kind
            return _present(module, [("weight", 1 if module.transposed else 0), ("bias", 0)]), kind
        if module.groups != 1:
            return None, kind
        return [("weight", 0 if module.transposed else 1)], kind
    if isinstance(module, nn.Linear):
        if kind == "out":
            return _present(module, [("weight", 0), ("bias", 0)]), kind
        return [("weight", 1)], kind
    if isinstance(module, nn.PReLU) and module.num_parameters == 1:
        return [], kind  # one slope shared by all channels: nothing to remove per channel
    if isinstance(module, _PER_CHANNEL):
        if any(p.ndim != 1 for p in module.parameters(recurse=False)):
            return None, kind
        return _present(module, [("weight", 0), ("bias", 0)]), "out"
    if any(True for _ in module.parameters(recurse=False)):
        return None, kind
    return [], kind


def _present(module: nn.Module, specs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(n, d) for n, d in specs if isinstance(getattr(module, n, None), torch.Tensor)]
