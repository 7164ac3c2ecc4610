"""Stage 4b, transformers: attention heads and MLP neurons (Hugging Face and plain torch), least-squares refit.

Architecture adapters, calibration of the output projections, costs, surgery and the LLM baselines.
May import the core, :mod:`orprune.layer`, :mod:`orprune.network` and :mod:`orprune.budget`.
"""

from orprune.transformer.adapters import TransformerUnit, find_units
from orprune.transformer.pruning import (
    TransformerPruner,
    TransformerPruneResult,
    TransformerUnitReport,
    prune_transformer,
)
from orprune.transformer.surgery import UnitUpdate, apply_updates, kept_widths, restore_widths
from orprune.transformer.torch_attention import SplitMultiheadAttention, split_attention

__all__ = [
    "SplitMultiheadAttention",
    "TransformerPruneResult",
    "TransformerPruner",
    "TransformerUnit",
    "TransformerUnitReport",
    "UnitUpdate",
    "apply_updates",
    "find_units",
    "kept_widths",
    "prune_transformer",
    "restore_widths",
    "split_attention",
]
