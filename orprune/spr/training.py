"""Training with the Structured Perspective Regularization end to end (``orprune spr`` runs it).

Train a copy of a model with ``task loss + strength * PerspectiveRegularizer``, remove the channel
groups below the threshold of :func:`orprune.spr.pruning.prune_by_threshold`, optionally fine-tune.
"""

from __future__ import annotations

import copy
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orprune.spr.pruning import SCORES, ThresholdPruning, prune_by_threshold
from orprune.spr.regularizer import PerspectiveRegularizer
from orprune.training import evaluate, train

__all__ = ["DEFAULT_M_SCALE", "DEFAULT_STRENGTH", "SPRTraining", "train_with_spr"]

# Defaults: the strongest setting of benchmarks/results/perspective_training*.md that did not cost
# accuracy (ResNet-20, Fashion-MNIST, 2 epochs); strength 0.05 already collapsed training there.
DEFAULT_STRENGTH = 0.015
DEFAULT_M_SCALE = 4.0


# ------------------------------------------------------------------------------------ end to end
@dataclass(frozen=True)
class SPRTraining:
    """Outcome of :func:`train_with_spr`.

    Attributes
    ----------
    model : torch.nn.Module
        The pruned (and fine-tuned, when asked) model.
    trained : torch.nn.Module
        The model after SPR training, before removal.
    regularizer : PerspectiveRegularizer
        The regulariser, reading ``trained``.
    pruning : ThresholdPruning
    accuracy_finetuned : float or None
        Validation accuracy after fine-tuning; ``None`` without fine-tuning.
    train_seconds, finetune_seconds : float
    """

    model: nn.Module
    trained: nn.Module
    regularizer: PerspectiveRegularizer
    pruning: ThresholdPruning
    accuracy_finetuned: float | None
    train_seconds: float
    finetune_seconds: float


def train_with_spr(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    lam: float = 0.5,
    strength: float = DEFAULT_STRENGTH,
    m_scale: float = DEFAULT_M_SCALE,
    tolerance: float = 0.005,
    score: str = "norm",
    epochs: float = 2,
    finetune_epochs: float = 0,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    seed: int = 0,
    channels_last: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **regularizer_options: Any,
) -> SPRTraining:
    r"""Train a copy of ``model`` with SPR, remove channels by :func:`prune_by_threshold`, fine-tune.

    The training loss is :math:`L(\theta) + s \, R(\theta)` with :math:`R` the
    :class:`~orprune.spr.PerspectiveRegularizer` (``alpha``, ``lam``, ``M="auto"`` with
    ``m_scale`` taken at the start of training) and :math:`s` = ``strength``; the optimiser is
    :func:`orprune.training.train`'s (SGD Nesterov, one-cycle, weight decay ``weight_decay``).
    Fine-tuning (``finetune_epochs > 0``) uses the same loop without the regulariser. ``score`` is the
    value the threshold runs on (:func:`prune_by_threshold`): with ``relative=True`` (a regulariser
    option) ``score="relative_norm"`` thresholds what the penalty sees.

    ``regularizer_options`` go to :class:`PerspectiveRegularizer` (``ignored_layers``,
    ``include_consumers``, ...). ``channels_last`` trains in that memory format (see :func:`orprune.training.train`);
    the returned models are in the default format. The input ``model`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not strength >= 0:
        raise ValueError(f"`strength` must be a number >= 0; got {strength!r}.")
    if score not in SCORES:  # checked before training, not after
        raise ValueError(f"`score` must be one of {list(SCORES)}; got {score!r}.")
    if not isinstance(finetune_epochs, numbers.Real) or finetune_epochs < 0:
        raise ValueError(f"`finetune_epochs` must be >= 0; got {finetune_epochs!r}.")
    trained = copy.deepcopy(model)
    regularizer = PerspectiveRegularizer(trained.eval(), alpha=alpha, lam=lam, m_scale=m_scale,
                                         example_inputs=val_images[:1], **regularizer_options)
    options = dict(batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, channels_last=channels_last,
                   progress=progress, log=log)
    start = time.perf_counter()
    train(trained, images, labels, epochs=epochs, regularizer=regularizer,
          regularizer_strength=float(strength), **options)
    train_seconds = time.perf_counter() - start
    pruning = prune_by_threshold(trained, regularizer, val_images, val_labels, tolerance=tolerance, score=score)
    if log:
        log(pruning.summary())
    final, accuracy, finetune_seconds = pruning.model, None, 0.0
    if finetune_epochs > 0:
        final = copy.deepcopy(pruning.model)
        start = time.perf_counter()
        train(final, images, labels, epochs=finetune_epochs, **options)
        finetune_seconds = time.perf_counter() - start
        final = final.eval()
        accuracy = evaluate(final, val_images, val_labels)
    return SPRTraining(final, trained.eval(), regularizer, pruning, accuracy, train_seconds, finetune_seconds)
