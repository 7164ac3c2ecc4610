"""Training-time regularisers that drive whole channel groups to zero."""

from __future__ import annotations

from orprune.regularizers.group_costs import channel_group_costs
from orprune.regularizers.groups import ChannelGroup, GroupMember, trace_channel_groups
from orprune.regularizers.perspective import PerspectiveRegularizer
from orprune.regularizers.spr import spr_optimal_y, spr_penalty

__all__ = [
    "ChannelGroup",
    "channel_group_costs",
    "GroupMember",
    "PerspectiveRegularizer",
    "spr_optimal_y",
    "spr_penalty",
    "trace_channel_groups",
]
