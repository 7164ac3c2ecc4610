"""Apply a pruning plan: remove channels physically, write the reconstructed weights and biases.

A :class:`PruningPlan` says, per unit, which channels stay and, per consumer, its least-squares
weights (the ``(C*g, n_out)`` matrix of :class:`orprune.layer.result.Selection`, rows of dropped channels
ignored) and bias. Two realisations give the same function:

* :func:`masked_copy` keeps the architecture: the dropped channels' consumer weights are zero, the new
  weights and biases are written, and a LayerNorm / GroupNorm over the channels normalises over the kept
  ones only (``formulations/channel_norms.md``);
* :func:`apply_pruning` takes that masked copy and removes the dropped channels through
  torch-pruning's dependency groups (the producer's filters, BatchNorm entries, depthwise filters and
  the consumers' input slices), leaving a smaller plain ``nn.Module``. Units through a ``chunk`` or a
  channel shuffle (``PrunableUnit.traced``) are sliced by orprune's own index maps instead, and the result is checked
  against the masked copy on ``example_inputs``.

A bias for a consumer that has none is folded into the running mean of the BatchNorm that alone
reads its output (``BN(y + b) = BN'(y)`` with ``mu' = mu - b`` in eval mode), or of every BatchNorm
reading it through concatenations (DenseNet), so the architecture and the cost model do not change;
otherwise a bias parameter is added. The user's model is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from orprune.network._kept_norms import channel_count, mask_norm
from orprune.network.chunks import slice_traced
from orprune.network.graph import (
    Consumer,
    PruningGraph,
    build_dependency_graph,
    call_model,
    set_weight_matrix,
    unit_group,
    weight_matrix,
)

__all__ = ["ConsumerUpdate", "PruningPlan", "apply_pruning", "masked_copy", "write_updates"]


def _tensor(value: Any, name: str) -> torch.Tensor:
    try:
        value = value.detach().cpu() if hasattr(value, "detach") else value
        t = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a numeric array.") from exc
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{name}` must be finite; it holds NaN or inf values.")
    return t


@dataclass(frozen=True)
class ConsumerUpdate:
    """New parameters of one consumer.

    Attributes
    ----------
    weight : array_like, shape (C*g, n_out), optional
        Layout of :func:`orprune.network.graph.weight_matrix` (``Selection.weights``), over every input
        channel of the layer (``Consumer.n_features`` rows, more than the unit's after a
        concatenation); rows of dropped channels are ignored. None keeps the current weights.
    bias : array_like, shape (n_out,), optional
        The consumer's new bias (for a centred problem: ``old_bias + mean_y - mean_x @ weight``).
        None keeps the current bias.
    """

    weight: Any = None
    bias: Any = None

    def __post_init__(self) -> None:
        if self.weight is not None:
            w = _tensor(self.weight, "weight")
            if w.ndim != 2:
                raise ValueError(f"`weight` must be a 2-D (C*g, n_out) array, got shape {tuple(w.shape)}.")
            object.__setattr__(self, "weight", w)
        if self.bias is not None:
            b = _tensor(self.bias, "bias")
            if b.ndim != 1:
                raise ValueError(f"`bias` must be a 1-D array, got shape {tuple(b.shape)}.")
            object.__setattr__(self, "bias", b)


@dataclass(frozen=True)
class PruningPlan:
    """What to keep and what to write.

    Attributes
    ----------
    keep : mapping unit name -> array of int
        Kept channel indices of each unit (sorted, unique, at least one); units left out keep all.
    updates : mapping consumer name -> ConsumerUpdate
    """

    keep: Mapping[str, Any]
    updates: Mapping[str, ConsumerUpdate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.keep, Mapping) or not isinstance(self.updates, Mapping):
            raise ValueError("`keep` and `updates` must be mappings.")
        keep = {}
        for unit, idx in self.keep.items():
            arr = np.asarray(idx.detach().cpu() if hasattr(idx, "detach") else idx)
            if arr.dtype == bool:
                arr = np.flatnonzero(arr)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(
                    f"`keep[{unit!r}]` must be a non-empty 1-D array of channel indices or a boolean mask."
                )
            arr = np.unique(arr.astype(np.int64))
            arr.flags.writeable = False
            keep[unit] = arr
        updates = {}
        for name, up in self.updates.items():
            if not isinstance(up, ConsumerUpdate):
                raise ValueError(f"`updates[{name!r}]` must be a ConsumerUpdate, got {type(up).__name__}.")
            updates[name] = up
        # plain dicts (copies): a plan can be pickled, saved with the model or sent to a worker
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "updates", updates)

    def skeleton(self) -> PruningPlan:
        """The same structure without the values: pruning a fresh model with it gives a model whose
        ``load_state_dict`` accepts the state of the model pruned with ``self``."""
        return PruningPlan(
            self.keep,
            {n: ConsumerUpdate(bias=torch.zeros_like(u.bias))
             for n, u in self.updates.items() if u.bias is not None},
        )


def _validate(graph: PruningGraph, plan: PruningPlan) -> dict[str, tuple[Consumer, np.ndarray | None]]:
    """Consumer name -> (consumer, dropped channels or None)."""
    if not isinstance(graph, PruningGraph):
        raise ValueError(f"`graph` must be a PruningGraph from `find_groups`, got {type(graph).__name__}.")
    if not isinstance(plan, PruningPlan):
        raise ValueError(f"`plan` must be a PruningPlan, got {type(plan).__name__}.")
    for unit, idx in plan.keep.items():
        if unit not in graph:
            raise ValueError(
                f"`plan.keep` names {unit!r}, which is not a prunable unit; units: {list(graph.names)}."
            )
        n = graph[unit].n_channels
        if idx[-1] >= n or idx[0] < 0:
            raise ValueError(f"`plan.keep[{unit!r}]` must hold indices in [0, {n}), got {idx.tolist()}.")
    consumers = {c.name: c for c in graph.consumers}
    out: dict[str, tuple[Consumer, np.ndarray | None]] = {}
    for c in consumers.values():  # dropped input channels of the layer, over every unit it reads
        dropped = np.flatnonzero(~graph.input_mask(c.name, plan.keep))
        out[c.name] = (c, dropped if dropped.size else None)
    for name, up in plan.updates.items():
        if name not in consumers:
            raise ValueError(f"`plan.updates` names {name!r}, which is not a consumer of any unit.")
        c = consumers[name]
        if up.weight is not None and tuple(up.weight.shape) != (c.n_features, c.n_outputs):
            raise ValueError(
                f"`plan.updates[{name!r}].weight` must have shape (C*g, n_out) = "
                f"({c.n_features}, {c.n_outputs}), got {tuple(up.weight.shape)}."
            )
        if up.bias is not None and tuple(up.bias.shape) != (c.n_outputs,):
            raise ValueError(
                f"`plan.updates[{name!r}].bias` must have shape ({c.n_outputs},), "
                f"got {tuple(up.bias.shape)}."
            )
    return out


def _write_bias(model: nn.Module, consumer: Consumer, bias: torch.Tensor) -> None:
    module = model.get_submodule(consumer.name)
    ref = module.weight
    if module.bias is not None:
        with torch.no_grad():
            module.bias.copy_(bias.to(module.bias))
    elif consumer.norm is not None:
        norm = model.get_submodule(consumer.norm)
        with torch.no_grad():
            norm.running_mean.sub_(bias.to(norm.running_mean))
    elif consumer.norms:  # read through concatenations by BatchNorms only: fold into each
        for name, channels in consumer.norms:
            norm = model.get_submodule(name)
            with torch.no_grad():
                norm.running_mean[list(channels)] -= bias.to(norm.running_mean)
    else:
        module.bias = nn.Parameter(bias.to(device=ref.device, dtype=ref.dtype))


def masked_copy(model: nn.Module, graph: PruningGraph, plan: PruningPlan) -> nn.Module:
    """A deep copy of ``model`` that computes what the pruned model computes, without removing anything.

    The input weights of dropped channels are zero in every consumer of their unit, and each
    update's weight and bias are written (see the module docstring for biases). A LayerNorm or
    GroupNorm over a unit's channels gets a forward hook that normalises over the kept channels only
    (:class:`orprune.network._kept_norms.KeptChannelsNorm`): what the pruned norm computes.
    """
    model = _masked_weights(model, graph, plan)
    dropped: dict[str, set[int]] = {}
    for unit_name, kept in plan.keep.items():
        unit = graph[unit_name]
        gone = unit.root_channels(np.setdiff1d(np.arange(unit.n_channels), kept))
        for name, channels in unit.norms:
            dropped.setdefault(name, set()).update(channels[r] for r in gone)
    for name, gone in dropped.items():
        if gone:
            module = model.get_submodule(name)
            mask_norm(module, sorted(set(range(channel_count(module))) - gone))
    return model


def _masked_weights(model: nn.Module, graph: PruningGraph, plan: PruningPlan) -> nn.Module:
    """A deep copy of ``model`` with the plan's consumer weights and biases written, dropped inputs zero."""
    consumers = _validate(graph, plan)
    model = copy.deepcopy(model)
    for name, (consumer, dropped) in consumers.items():
        _write_consumer(model, consumer, dropped, plan.updates.get(name))
    return model


def write_updates(masked: nn.Module, graph: PruningGraph, plan: PruningPlan, names: Iterable[str]) -> None:
    """In place: write the updates of the consumers ``names`` into ``masked``.

    ``masked`` must be ``masked_copy(model, graph, plan')`` with ``plan'`` the same ``keep`` and none of
    these consumers' updates (each consumer written once: a bias folded into a BatchNorm is subtracted
    from its running mean). The result then equals ``masked_copy(model, graph, plan)`` restricted to the
    updates written so far: the sequential refit updates one working copy instead of copying the model
    per consumer.
    """
    consumers = _validate(graph, plan)
    for name in names:
        consumer, dropped = consumers[name]
        _write_consumer(masked, consumer, dropped, plan.updates.get(name))


def _write_consumer(model: nn.Module, consumer: Consumer, dropped: np.ndarray | None,
                    update: ConsumerUpdate | None) -> None:
    if update is None and dropped is None:
        return
    module = model.get_submodule(consumer.name)
    current = weight_matrix(module)
    w = current.clone() if update is None or update.weight is None else update.weight.to(current)
    if dropped is not None:
        rows = (dropped[:, None] * consumer.group_size + np.arange(consumer.group_size)).ravel()
        w[torch.as_tensor(rows)] = 0
    set_weight_matrix(module, w)
    if update is not None and update.bias is not None:
        _write_bias(model, consumer, update.bias)


def apply_pruning(
    model: nn.Module, graph: PruningGraph, plan: PruningPlan, example_inputs: Any
) -> nn.Module:
    """A physically pruned copy of ``model``.

    Parameters
    ----------
    model : nn.Module
        The model ``graph`` was found on; not modified.
    graph : PruningGraph
    plan : PruningPlan
    example_inputs : Tensor, tuple or dict
        Inputs for tracing the copy (as for :func:`orprune.network.graph.find_groups`).

    Returns
    -------
    nn.Module
        Same classes and module names as ``model``, smaller layers; same training flag. Its outputs
        equal those of ``masked_copy(model, graph, plan)`` up to rounding.
    """
    pruned = _masked_weights(model, graph, plan)
    dropped = {name: np.setdiff1d(np.arange(graph[name].n_channels), kept) for name, kept in plan.keep.items()}
    dropped = {name: d for name, d in dropped.items() if d.size}
    traced = [(graph[name], d) for name, d in dropped.items() if graph[name].traced]
    reference = _outputs(masked_copy(model, graph, plan), example_inputs) if traced else None
    # through a chunk / shuffle: orprune's maps first, then torch-pruning's groups re-traced
    slice_traced(pruned, traced)
    plain = [(graph[name], d) for name, d in dropped.items() if not graph[name].traced]
    if plain:
        dg, _ = build_dependency_graph(pruned, example_inputs)
        for unit, d in plain:
            unit_group(dg, pruned, unit, d.tolist()).prune()
    try:
        outputs = _outputs(pruned, example_inputs)
    except Exception as exc:  # a coupling torch-pruning missed: fail here, not in the user's hands
        raise RuntimeError(f"the pruned model no longer runs on `example_inputs`: {exc}") from exc
    if reference is not None:  # a traced unit: the pruned model must compute what the masked one does
        scale = max((float(r.abs().max()) for r in reference if r.numel()), default=0.0)
        worst = max((float((o - r).abs().max()) for o, r in zip(outputs, reference) if r.numel()), default=0.0)
        if len(outputs) != len(reference) or worst > 1e-3 * max(scale, 1.0):
            raise RuntimeError(f"the pruned model differs from the masked model by {worst:.3g} (of {scale:.3g}) "
                               "on `example_inputs`: a chunk or shuffle is not followed correctly; leave its "
                               "producer out (`ignored_layers`).")
    return pruned


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    """The model's output tensors on ``example_inputs`` in eval mode, without gradients (training flags restored)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = call_model(model, example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [t.float() for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor)]
