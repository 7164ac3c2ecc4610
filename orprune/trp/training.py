"""Trained Rank Pruning end to end: train with the regulariser and truncations, then decompose."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orprune.network.costs import count_macs_params
from orprune.training import train
from orprune.trp.regularizer import TrainedRankRegularizer

__all__ = ["TRPTraining", "train_with_trp"]


@dataclass(frozen=True)
class TRPTraining:
    """Outcome of :func:`train_with_trp`.

    Attributes
    ----------
    model : nn.Module
        The decomposed model (layers split in two where that saves MACs).
    trained : nn.Module
        The model after TRP training (weights low-rank from the last truncation), before decomposition.
    regularizer : TrainedRankRegularizer
        Reading ``trained``.
    ranks : dict of str -> int
        Each regularised layer's energy rank at the end.
    macs_before, macs_after, params_before, params_after : int
        Of the input model and of ``model`` (torch-pruning's counter).
    train_seconds : float
    """

    model: nn.Module
    trained: nn.Module
    regularizer: TrainedRankRegularizer
    ranks: dict[str, int]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    train_seconds: float


def train_with_trp(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float = 2,
    nuclear: float = 1e-4,
    energy: float = 0.98,
    period: int = 20,
    ignored_layers: Iterable[nn.Module | str] = (),
    calibration: Iterable[Any] | None = None,
    **train_options: Any,
) -> TRPTraining:
    """Train a copy of ``model`` with TRP and decompose it.

    The loss is ``task + nuclear * sum_l ||W_l||_*``; every ``period`` optimizer steps each layer is
    truncated to the rank keeping ``energy`` of its squared singular values, and once more at the end;
    then :meth:`TrainedRankRegularizer.decompose` splits the layers (with ``calibration``: the optimal
    maps of those ranks, :func:`orprune.select_rank`; without: the SVD of the weights, as TRP).
    ``train_options`` go to :func:`orprune.training.train` (``lr``, ``batch_size``, ``seed``, ...).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(nuclear, bool) or not isinstance(nuclear, (int, float)) or not nuclear >= 0:
        raise ValueError(f"`nuclear` must be a number >= 0, got {nuclear!r}.")
    example = images[:1]
    macs_before, params_before = count_macs_params(model.eval(), example)
    trained = copy.deepcopy(model)
    reg = TrainedRankRegularizer(trained, energy=energy, period=period, ignored_layers=ignored_layers)
    start = time.perf_counter()
    with reg.every_step():
        train(trained, images, labels, epochs=epochs, regularizer=reg, regularizer_strength=float(nuclear),
              **train_options)
    reg.truncate()
    seconds = time.perf_counter() - start
    decomposed = reg.decompose(calibration=calibration).eval()
    macs_after, params_after = count_macs_params(decomposed, example)
    return TRPTraining(model=decomposed, trained=trained.eval(), regularizer=reg, ranks=reg.ranks(),
                       macs_before=macs_before, macs_after=macs_after, params_before=params_before,
                       params_after=params_after, train_seconds=seconds)
