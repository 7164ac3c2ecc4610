"""Stage 4b, transformers: attention heads and MLP neurons of Hugging Face models, least-squares refit.

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

__all__ = [
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
]
