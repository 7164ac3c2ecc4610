"""What :func:`orprune.find_groups` returns: prunable units, their consumers, the groups left alone,
and the weight layout a consumer's least-squares problem uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

__all__ = ["Consumer", "ExcludedGroup", "ExclusionCode", "PrunableUnit", "PruningGraph", "set_weight_matrix",
           "weight_matrix"]


@dataclass(frozen=True)
class Consumer:
    """A layer whose input channels are the channels of one unit.

    Attributes
    ----------
    name : str
        Qualified module name (``model.get_submodule(name)``).
    kind : {"conv", "linear"}
    unit : str
        Name of the unit whose channels it reads.
    n_channels : int
        ``C``, channels of the unit.
    group_size : int
        ``g``, feature columns per channel: ``kh * kw`` for a conv (through unfold), the number of
        features each channel becomes after a flatten for a Linear (1 after global pooling).
    n_outputs : int
        Output channels / features.
    norm : str or None
        The BatchNorm that is the only reader of this layer's output, if any: a bias added by the
        reconstruction can be folded into its running mean instead of adding a parameter.
    channels : tuple of int, tuple of tuples of int, or None
        When the layer reads a concatenation: its input channel of each of the unit's channels
        (increasing); its other input channels come from other producers and are kept while this
        unit is selected (``formulations/fixed_columns.md``). For a unit through a ``chunk`` read by the
        layer in ``tie > 1`` parts, its ``tie`` input channels of each of the unit's channels
        (:mod:`orprune.network.chunks`). None: the unit's channels are all its inputs, in order.
    n_inputs : int or None
        The layer's input channels (``n_channels`` when None).
    norms : tuple of (str, tuple of int)
        When the output goes through concatenations to BatchNorms only (DenseNet): each BatchNorm
        with its channel of each output channel; a bias is folded into all their running means.
    tie : int
        Input channels per decision: the unit's channel ``c`` is the layer's inputs ``c + j * n_channels``
        for ``j < tie`` (a unit tied by a grouped convolution, :class:`PrunableUnit`), or ``channels[c]``.
    groups : int
        The layer's ``groups`` (a grouped convolution): its least squares is block-diagonal by group.
    sketch : int
        Columns per input channel of the layer's *selection* problem: ``group_size`` (exact) unless the
        layer is wider than ``max_features`` (``C * g`` columns), then ``s < g`` compressed columns per channel
        and the exact refit from stored rows (:mod:`orprune.layer.wide`, ``formulations/wide_consumers.md``).
    """

    name: str
    kind: str
    unit: str
    n_channels: int
    group_size: int
    n_outputs: int
    norm: str | None = None
    channels: tuple[int, ...] | None = None
    n_inputs: int | None = None
    norms: tuple[tuple[str, tuple[int, ...]], ...] = ()
    tie: int = 1
    groups: int = 1
    sketch: int = 0

    @property
    def wide(self) -> bool:
        """Whether the selection problem is compressed (``0 < sketch < group_size``)."""
        return 0 < self.sketch < self.group_size

    @property
    def n_input_channels(self) -> int:
        """The layer's input channels: the unit's and, after a concatenation, the others."""
        return self.n_channels * self.tie if self.n_inputs is None else self.n_inputs

    @property
    def input_channels(self) -> np.ndarray:
        """The layer's input channel of each of the unit's channels, shape ``(n_channels,)``, or
        ``(n_channels, tie)`` for a tied unit."""
        if self.channels is not None:  # a concatenation, or the parts of a chunk (shape (n_channels, tie))
            return np.asarray(self.channels)
        if self.tie > 1:
            return np.arange(self.n_channels)[:, None] + self.n_channels * np.arange(self.tie)[None, :]
        return np.arange(self.n_channels)

    @property
    def n_features(self) -> int:
        """Columns of the layer's design matrix (rows of its weight matrix), ``n_inputs * g``."""
        return self.n_input_channels * self.group_size


@dataclass(frozen=True)
class PrunableUnit:
    """One prunable channel group: a keep count of it is one decision.

    Attributes
    ----------
    name : str
        Stable unit name: the root module's qualified name.
    root : str
        Module whose output channels index the unit.
    n_channels : int
    consumers : tuple of Consumer
        Layers whose input slices go with the channels (one shared decision when several).
    carried : tuple of str
        Parameterised modules sliced along (BatchNorm, depthwise convs, ...).
    tie : int, default 1
        Root channels per decision. A grouped convolution (``groups = G``) as producer or consumer
        keeps its group count only if every group loses the same channels; the unit's channel ``c``
        then stands for the root channels ``c + j * n_channels``, ``j < G`` (position ``c`` in every
        group), and ``n_channels`` is the root's channels over ``G``. A GroupNorm of ``G`` groups on the
        channels ties them the same way (every group keeps as many channels).
    norms : tuple of (str, tuple of int)
        The LayerNorms / GroupNorms over the channels (carried too), each with its channel of every root
        channel: removing channels changes what they normalise over (``formulations/channel_norms.md``),
        so :func:`orprune.network.surgery.masked_copy` replaces them by norms over the kept channels.
    traced : tuple of (str, tuple of int)
        Non-empty for a unit whose channels pass through a ``chunk`` or a channel shuffle (its ``tie`` is the
        number of root channels each decision ties there): every module its channels flow through (the root
        first), with the root channel each of the module's output channels stands for (-1: not the unit's; a
        module may carry a decision several times). These units are sliced by these maps, not by
        torch-pruning's groups, which are wrong through a split or a shuffle (:mod:`orprune.network.label_maps`).
    """

    name: str
    root: str
    n_channels: int
    consumers: tuple[Consumer, ...]
    carried: tuple[str, ...]
    tie: int = 1
    norms: tuple[tuple[str, tuple[int, ...]], ...] = ()
    traced: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def root_channels(self, idxs: Any) -> list[int]:
        """The root module's channels of the unit's channels ``idxs``."""
        return sorted(int(c) + j * self.n_channels for c in np.asarray(idxs).ravel() for j in range(self.tie))


#: Why a group was left alone, for code that acts on it (the ``reason`` text is for people and may be reworded):
#: ``"partial_read"``, a consumer reads the channels out of order or only partly (torch-pruning's slice of the
#: consumer is refused; through a concatenation, ``find_groups`` retries the group with orprune's label maps);
#: ``"model_output"``, the channels are (or only feed) the model's output: nothing to act on, so ``find_groups``
#: does not warn about them.
ExclusionCode = Literal["partial_read", "model_output"]


@dataclass(frozen=True)
class ExcludedGroup:
    """A channel group left unpruned, and why: ``reason`` in words, ``code`` where a caller acts on the reason
    (None for the others)."""

    root: str
    modules: tuple[str, ...]
    reason: str
    code: ExclusionCode | None = None


@dataclass(frozen=True)
class PruningGraph:
    """The prunable units of a model and the groups left alone.

    Attributes
    ----------
    units : tuple of PrunableUnit
        In the order of their root modules in ``model.named_modules()``.
    excluded : tuple of ExcludedGroup
    chains : tuple of mapping unit -> tuple of int
        Units whose keep counts a chunk's balance ties (a ShuffleNetV2 stage's groups,
        :mod:`orprune.network.balance`): per chain, each unit's possible keep counts, increasing, the ``t``-th of
        every unit taken together (one option for a unit the balance fixes). Units in no chain choose freely.
    """

    units: tuple[PrunableUnit, ...]
    excluded: tuple[ExcludedGroup, ...]
    chains: tuple[Mapping[str, tuple[int, ...]], ...] = ()

    def __getitem__(self, name: str) -> PrunableUnit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise KeyError(f"no prunable unit named {name!r}; units: {[u.name for u in self.units]}")

    def __contains__(self, name: object) -> bool:
        return any(unit.name == name for unit in self.units)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(unit.name for unit in self.units)

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        """Every consumer of every unit."""
        return tuple(c for unit in self.units for c in unit.consumers)

    def readers(self, name: str) -> tuple[Consumer, ...]:
        """The entries of consumer ``name``, one per unit it reads (several after a concatenation)."""
        found = tuple(c for c in self.consumers if c.name == name)
        if not found:
            raise KeyError(f"no consumer named {name!r}.")
        return found

    def input_mask(self, name: str, keep: Mapping[str, Any]) -> np.ndarray:
        """Kept input channels of consumer ``name`` when each unit in ``keep`` keeps those channels.

        Channels of units not in ``keep`` and of no unit (other producers of a concatenation) are kept.
        """
        readers = self.readers(name)
        mask = np.ones(readers[0].n_input_channels, dtype=bool)
        for c in readers:
            if c.unit in keep:
                unit_mask = np.zeros(c.n_channels, dtype=bool)
                unit_mask[np.asarray(keep[c.unit], dtype=np.int64)] = True
                mask[c.input_channels[~unit_mask]] = False
        return mask

    def consumer(self, name: str) -> Consumer:
        for c in self.consumers:
            if c.name == name:
                return c
        raise KeyError(f"no consumer named {name!r}.")

    @property
    def n_channels(self) -> dict[str, int]:
        """Unit name -> number of channels (the keep counts of the unpruned model)."""
        return {unit.name: unit.n_channels for unit in self.units}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The consumer's weights as the ``(C*g, n_out)`` matrix of :class:`~orprune.layer.problem.LayerProblem`.

    Row ``c*g + j`` multiplies feature ``j`` of channel ``c``: for a ``Conv2d`` the unfold order
    ``(c, kh, kw)``, for a ``Linear`` the input features in order. A grouped ``Conv2d`` gives its dense
    equivalent: zero outside the diagonal blocks (group ``j``'s inputs times its outputs).
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().T
    if isinstance(module, nn.Conv2d) and module.groups == 1 and not module.transposed:
        return module.weight.detach().reshape(module.out_channels, -1).T
    if isinstance(module, nn.Conv2d) and not module.transposed:  # grouped: the dense equivalent
        g, kk = module.groups, int(np.prod(module.kernel_size))
        per_in, per_out = module.in_channels // g, module.out_channels // g
        w = module.weight.detach().reshape(module.out_channels, per_in * kk)
        dense = w.new_zeros(module.in_channels * kk, module.out_channels)
        for j in range(g):
            dense[j * per_in * kk:(j + 1) * per_in * kk, j * per_out:(j + 1) * per_out] = w[j * per_out:(j + 1) * per_out].T
        return dense
    raise ValueError(f"`module` must be a Linear or a Conv2d, got {module!r}.")


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a ``(C*g, n_out)`` matrix (the layout of :func:`weight_matrix`) into ``module``; for a
    grouped conv only its diagonal blocks are read."""
    current = weight_matrix(module)
    if tuple(matrix.shape) != tuple(current.shape):
        raise ValueError(
            f"weights of shape {tuple(matrix.shape)} do not fit {module!r}: need {tuple(current.shape)}."
        )
    if isinstance(module, nn.Conv2d) and module.groups > 1:  # the diagonal blocks (the rest is zero)
        g, kk = module.groups, int(np.prod(module.kernel_size))
        per_in, per_out = module.in_channels // g, module.out_channels // g
        matrix = torch.cat([matrix[j * per_in * kk:(j + 1) * per_in * kk, j * per_out:(j + 1) * per_out]
                            for j in range(g)], dim=1)
    with torch.no_grad():
        module.weight.copy_(matrix.T.reshape(module.weight.shape).to(module.weight))
