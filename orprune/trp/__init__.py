"""Beside the pipeline, training: Trained Rank Pruning (TRP) and the decomposition that follows it.

A nuclear-norm regulariser with periodic energy-threshold truncation of every layer's weights, and the final
split of each layer into two thinner ones. May import the core, :mod:`orprune.layer`, :mod:`orprune.network`
and :mod:`orprune.training`.
"""

from __future__ import annotations

from orprune.trp.regularizer import TrainedRankRegularizer, energy_rank
from orprune.trp.training import TRPTraining, train_with_trp

__all__ = ["TRPTraining", "TrainedRankRegularizer", "energy_rank", "train_with_trp"]
