r"""UCP's channel importance: a modified squeeze-and-excitation block after each unit's producers.

Chang et al. (UCP, arXiv 2010.01251) put a squeeze-and-excitation block right after a convolution (before
its BatchNorm), train the network with it, and rank the convolution's output channels by their mean
excitation over the data; the channels with the lowest mean are pruned. Their block is "modified" for
narrow layers: with :math:`C \le 16` channels the bottleneck is one unit with biases
(:math:`C \to 1 \to C`), otherwise :math:`C \to C/16 \to C` without biases, a ReLU between and a sigmoid
at the end. Here the blocks are forward hooks on a deep copy of the model (the caller's model is never
touched), one per producer of each prunable unit (``formulations/ucp.md``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from orprune.network.graph import find_groups
from orprune.network.units import PrunableUnit, PruningGraph
from orprune.training import train

__all__ = ["ExcitationBlock", "SEImportance", "se_importance"]

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ExcitationBlock(nn.Module):
    r"""The modified squeeze-and-excitation block of UCP.

    .. math:: s = \operatorname{mean}_{\text{space}}(x), \qquad
              e = \sigma(W_2\, \mathrm{ReLU}(W_1 s + b_1) + b_2), \qquad y = e \odot x

    with :math:`W_1: C \to 1`, :math:`W_2: 1 \to C` and biases when ``channels <= reduction``, else
    :math:`W_1: C \to C / r`, :math:`W_2: C/r \to C` without biases (``r = reduction``).

    Parameters
    ----------
    channels : int
    reduction : int, default 16
    zero_init : bool, default True
        Start :math:`W_2` (and :math:`b_2`) at zero: every excitation starts at exactly 1/2, so after a
        brief training the differences between channels come from the data, not from the random
        initialisation (the paper trains the whole network from scratch and needs no such care). A channel
        that is zero everywhere gets no gradient on its row of :math:`W_2` and keeps 1/2. The first batch
        the block sees then flips the sign of each row of :math:`W_1` whose mean pre-activation on it is
        negative (:meth:`orient`), so that no hidden unit starts dead: a dead ReLU passes no gradient to
        :math:`W_1` and, without biases, would pin every excitation at 1/2.
    """

    def __init__(self, channels: int, reduction: int = 16, *, zero_init: bool = True) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"`channels` must be a positive integer, got {channels!r}.")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"`reduction` must be a positive integer, got {reduction!r}.")
        narrow = channels <= reduction
        hidden = 1 if narrow else channels // reduction
        self.channels = channels
        self.squeeze_to = nn.Linear(channels, hidden, bias=narrow)
        self.expand = nn.Linear(hidden, channels, bias=narrow)
        self.oriented = not zero_init
        if zero_init:
            nn.init.zeros_(self.expand.weight)
            if self.expand.bias is not None:
                nn.init.zeros_(self.expand.bias)

    @torch.no_grad()
    def orient(self, s: torch.Tensor) -> None:
        """Flip the rows of :math:`W_1` (and :math:`b_1`) whose mean pre-activation over squeezed inputs
        ``s`` (N, C) is negative; with :math:`W_2 = 0` the block's output does not change."""
        sign = torch.where(self.squeeze_to(s).mean(0) < 0, -1.0, 1.0)
        self.squeeze_to.weight.mul_(sign[:, None])
        if self.squeeze_to.bias is not None:
            self.squeeze_to.bias.mul_(sign)
        self.oriented = True

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The gates ``e``, shape ``(N, C)``, of inputs ``(N, C, ...)`` (channels in dimension 1)."""
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected inputs (N, {self.channels}, ...), got shape {tuple(x.shape)}.")
        s = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x
        if not self.oriented:
            self.orient(s.detach())
        return torch.sigmoid(self.expand(torch.relu(self.squeeze_to(s))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.excitation(x)
        return x * e.reshape(*e.shape, *([1] * (x.ndim - 2)))


@dataclass(frozen=True)
class SEImportance:
    """Mean excitations per unit channel, and how they were obtained.

    Attributes
    ----------
    scores : mapping unit -> ndarray of shape (n_channels,)
        Mean excitation of each of the unit's channels over the scoring images (averaged over the unit's
        producers, and over the positions a grouped convolution ties); higher is more important.
    producers : mapping unit -> tuple of str
        The modules that got a block.
    freeze : bool
        Whether only the blocks were trained (the model's weights and BatchNorm statistics fixed).
    epochs : float
    train_seconds, cpu_seconds : float
        Wall and process CPU time of the training and scoring.
    status : str
        ``"feasible"``: a heuristic ranking, no optimality claim.
    """

    scores: Mapping[str, np.ndarray]
    producers: Mapping[str, tuple[str, ...]]
    freeze: bool
    epochs: float
    train_seconds: float
    cpu_seconds: float
    status: str = "feasible"

    def top(self, unit: str, k: int) -> np.ndarray:
        """The ``k`` highest-scored channels of ``unit`` (ties: lower index first), sorted."""
        scores = self.scores[unit]
        return np.sort(np.argsort(-scores, kind="stable")[:k])


def producers(model: nn.Module, unit: PrunableUnit) -> tuple[str, ...]:
    """The unit's root and the convolutions / Linears sliced along its channels: what writes them."""
    names = [unit.root] + [n for n in unit.carried if isinstance(model.get_submodule(n), _PRODUCERS)]
    return tuple(dict.fromkeys(names))


def _root_labels(unit: PrunableUnit, module_name: str) -> np.ndarray | None:
    """A producer's root channel of each output channel (-1: none) in a unit traced through a chunk or shuffle
    (a C2f bottleneck's output conv, a ShuffleNetV2 stage's convs, whose root also writes the stage's other units:
    ``PrunableUnit.traced``); None: the producer's channels are the root's, in order."""
    return next((np.asarray(channels) for name, channels in unit.traced if name == module_name), None)


def _per_root(unit: PrunableUnit, module_name: str, excitations: np.ndarray) -> np.ndarray:
    """A producer's mean excitations by root channel (NaN where it does not write the root channel)."""
    labels = _root_labels(unit, module_name)
    if labels is None:
        return excitations
    sums = np.bincount(labels[labels >= 0], excitations[labels >= 0], minlength=unit.n_channels * unit.tie)
    counts = np.bincount(labels[labels >= 0], minlength=unit.n_channels * unit.tie)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


class _WithExcitation(nn.Module):
    """The copied model with its blocks; with ``freeze`` the model stays in eval mode while training."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleDict, freeze: bool) -> None:
        super().__init__()
        self.model, self.blocks, self.freeze = model, blocks, freeze

    def train(self, mode: bool = True) -> _WithExcitation:
        self.training = mode
        self.blocks.train(mode)
        self.model.train(mode and not self.freeze)
        return self

    def forward(self, *args: Any) -> Any:
        return self.model(*args)


def _check(images: Any, labels: Any, epochs: Any, freeze: Any) -> None:
    if not torch.is_tensor(images) or images.ndim < 2 or not len(images):
        raise ValueError("`images` must be a non-empty tensor of inputs (N, ...).")
    if not torch.is_tensor(labels) or labels.shape != (len(images),):
        raise ValueError(f"`labels` must be a tensor of shape ({len(images)},), one class per image.")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
        raise ValueError(f"`epochs` must be a positive number, got {epochs!r}.")
    if not isinstance(freeze, bool):
        raise ValueError(f"`freeze` must be True or False, got {freeze!r}.")


def se_importance(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    graph: PruningGraph | None = None,
    units: Sequence[str] | None = None,
    epochs: float = 1.0,
    lr: float = 0.01,
    batch_size: int = 128,
    freeze: bool = False,
    reduction: int = 16,
    flip: bool = True,
    score_images: torch.Tensor | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = False,
) -> SEImportance:
    """UCP's importance of every channel of the prunable units: train excitation blocks, average them.

    A deep copy of ``model`` gets an :class:`ExcitationBlock` after each producer of each unit (a forward
    hook multiplying the producer's output by its excitations, before any BatchNorm, as in the paper),
    is trained briefly with :func:`orprune.training.train` (cross-entropy, SGD, one-cycle ``lr``), and the
    excitations are averaged over ``score_images``. ``model`` itself is not changed.

    Parameters
    ----------
    model : nn.Module
        A trained classifier.
    images, labels : tensors
        Training data of the blocks (and of the model unless ``freeze``).
    graph : PruningGraph, optional
        The units to score (``Pruner.graph_``, so the scores' unit names match the pruner's); traced with
        :func:`orprune.find_groups` on ``images[:1]`` when None.
    units : sequence of str, optional
        Score only these units (default: all).
    epochs, lr, batch_size, flip, seed, threads, progress
        Passed to :func:`orprune.training.train`.
    freeze : bool, default False
        False, as in the paper: the blocks and the network train together (the paper trains the network
        with its blocks from scratch; here from the trained weights, briefly). True: only the blocks train,
        the model's weights and BatchNorm statistics stay as they are.
    reduction : int, default 16
    score_images : tensor, optional
        Images over which the excitations are averaged (default: ``images``).

    Returns
    -------
    SEImportance
    """
    _check(images, labels, epochs, freeze)
    start, cpu_start = time.perf_counter(), time.process_time()
    work = copy.deepcopy(model).eval()
    if graph is None:
        graph = find_groups(work, images[:1])
    if not isinstance(graph, PruningGraph):
        raise ValueError(f"`graph` must be a PruningGraph, got {type(graph).__name__}.")
    names = graph.names if units is None else tuple(units)
    unknown = [u for u in names if u not in graph]
    if unknown:
        raise ValueError(f"`units` names units the graph does not have: {unknown}.")
    blocks, sums, counts, owners = nn.ModuleDict(), {}, {}, {}
    handles = []
    recording = [False]
    for name in names:
        unit = graph[name]
        owners[name] = producers(work, unit)
        for module_name in owners[name]:
            if module_name in counts:  # a producer shared by units (a ShuffleNetV2 stage's convs): one block
                continue
            module = work.get_submodule(module_name)
            root_labels = _root_labels(unit, module_name)
            channels = unit.n_channels * unit.tie if root_labels is None else len(root_labels)
            block = ExcitationBlock(channels, reduction)
            key = module_name.replace(".", "/")
            blocks[key] = block
            sums[module_name], counts[module_name] = torch.zeros(channels, dtype=torch.float64), 0

            def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor, block: ExcitationBlock = block,
                     module_name: str = module_name) -> torch.Tensor:
                if not torch.is_tensor(output) or output.ndim < 2 or output.shape[1] != block.channels:
                    raise ValueError(f"`{module_name}` gives outputs of shape "
                                     f"{tuple(getattr(output, 'shape', ()))}; an excitation block needs "
                                     f"(N, {block.channels}, ...).")
                gates = block.excitation(output)
                if recording[0]:
                    sums[module_name] += gates.detach().double().sum(0)
                    counts[module_name] += len(gates)
                return output * gates.reshape(*gates.shape, *([1] * (output.ndim - 2)))

            handles.append(module.register_forward_hook(hook))
    if freeze:
        for p in work.parameters():
            p.requires_grad_(False)
    wrapped = _WithExcitation(work, blocks, freeze)
    try:
        train(wrapped, images, labels, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, flip=flip,
              threads=threads, progress=progress)
        wrapped.eval()
        recording[0] = True
        with torch.no_grad():
            for x in (images if score_images is None else score_images).split(max(batch_size, 256)):
                wrapped(x)
    finally:
        for handle in handles:
            handle.remove()
    scores = {}
    for name in names:
        unit = graph[name]
        per_root = np.nanmean(np.stack([_per_root(unit, m, (sums[m] / max(counts[m], 1)).numpy())
                                        for m in owners[name]]), axis=0)
        # unit channel c stands for root channels c + j * n_channels, j < tie
        scores[name] = per_root.reshape(unit.tie, unit.n_channels).mean(0)
        scores[name].flags.writeable = False
    return SEImportance(scores=MappingProxyType(scores), producers=MappingProxyType(owners), freeze=freeze,
                        epochs=float(epochs), train_seconds=time.perf_counter() - start,
                        cpu_seconds=time.process_time() - cpu_start)
