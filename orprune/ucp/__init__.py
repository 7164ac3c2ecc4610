"""Beside the pipeline, training: UCP's channel importance from modified squeeze-and-excitation blocks.

The excitation block, its hooks on a copy of a model, brief training and the mean excitation per channel.
May import the core, :mod:`orprune.layer`, :mod:`orprune.network` and :mod:`orprune.training`.
"""

from __future__ import annotations

from orprune.ucp.excitation import ExcitationBlock, SEImportance, se_importance

__all__ = ["ExcitationBlock", "SEImportance", "se_importance"]
