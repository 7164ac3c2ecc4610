"""Beside the pipeline, training: the Structured Perspective Regularization (SPR) and what follows it.

The closed-form penalty, the regulariser over a model's coupled channel groups, threshold removal and
training end to end. May import the core, :mod:`orprune.layer`, :mod:`orprune.network` and :mod:`orprune.training`.
"""

from __future__ import annotations

from orprune.spr.group_costs import channel_group_costs
from orprune.spr.groups import ChannelGroup, GroupMember, trace_channel_groups
from orprune.spr.penalty import spr_optimal_y, spr_penalty
from orprune.spr.pruning import ThresholdPruning, prune_by_threshold
from orprune.spr.regularizer import PerspectiveRegularizer
from orprune.spr.training import SPRTraining, train_with_spr

__all__ = [
    "ChannelGroup",
    "GroupMember",
    "PerspectiveRegularizer",
    "SPRTraining",
    "ThresholdPruning",
    "channel_group_costs",
    "prune_by_threshold",
    "spr_optimal_y",
    "spr_penalty",
    "trace_channel_groups",
    "train_with_spr",
]
