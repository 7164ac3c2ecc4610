"""Beside the pipeline, training: coarse-to-fine (group, then entry) gating with a budget penalty (Sahbi, ICML 2024).

Band-stop gates on weights and channels, the budget penalty, hardening through the hierarchical MIP, the training
loop, and a hand-written graph convolutional network. May import the core, :mod:`orprune.layer` and :mod:`orprune.training`.
"""

from __future__ import annotations

from orprune.c2f.gates import GatedWeight, band_stop
from orprune.c2f.gcn import GraphConv, GridGCN, grid_adjacency, normalize_adjacency
from orprune.c2f.hardening import GatingMasks, split_budget
from orprune.c2f.regularizer import CoarseToFineGating
from orprune.c2f.training import GatingTraining, finetune_with_masks, train_with_gating

__all__ = [
    "CoarseToFineGating",
    "GatedWeight",
    "GatingMasks",
    "GatingTraining",
    "GraphConv",
    "GridGCN",
    "band_stop",
    "finetune_with_masks",
    "grid_adjacency",
    "normalize_adjacency",
    "split_budget",
    "train_with_gating",
]
