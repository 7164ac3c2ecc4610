"""Training with the Structured Perspective Regularization end to end, and ``orprune spr``.

Train a copy of a model with ``task loss + strength * PerspectiveRegularizer``, remove the channel
groups below the threshold of :func:`orprune.spr_pruning.prune_by_threshold`, optionally fine-tune.
"""

from __future__ import annotations

import argparse
import copy
import json
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from orprune.regularizers.perspective import PerspectiveRegularizer
from orprune.spr_pruning import SCORES, ThresholdPruning, prune_by_threshold
from orprune.training import evaluate, train

__all__ = ["SPRTraining", "add_spr_arguments", "run_spr", "train_with_spr"]

# Defaults: the strongest setting of benchmarks/results/perspective_training*.md that did not cost
# accuracy (ResNet-20, Fashion-MNIST, 2 epochs); strength 0.05 already collapsed training there.
_DEFAULT_STRENGTH = 0.015
_DEFAULT_M_SCALE = 4.0


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
    strength: float = _DEFAULT_STRENGTH,
    m_scale: float = _DEFAULT_M_SCALE,
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
    :class:`~orprune.regularizers.PerspectiveRegularizer` (``alpha``, ``lam``, ``M="auto"`` with
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


# ------------------------------------------------------------------------------------ command line
def add_spr_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``orprune spr``: train with SPR, threshold, remove, fine-tune, save."""
    parser.add_argument("--model", choices=["resnet20", "small_cnn"], default="resnet20",
                        help="architecture trained from scratch (orprune.zoo)")
    parser.add_argument("--init", default=None, help="start from a saved model (torch.save of the whole module)")
    parser.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto",
                        help="auto: Fashion-MNIST when installed, else digits")
    parser.add_argument("--data-root", default=None, help="a directory holding the Fashion-MNIST IDX files")
    parser.add_argument("--train-size", type=int, default=None, help="training images (default: all not held out)")
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for the threshold")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--finetune-epochs", type=float, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="SPR quadratic weight")
    parser.add_argument("--lam", type=float, default=None, help="SPR indicator cost (default 1 - alpha)")
    parser.add_argument("--strength", type=float, default=_DEFAULT_STRENGTH, help="multiplier of the SPR term")
    parser.add_argument("--m-scale", type=float, default=_DEFAULT_M_SCALE,
                        help="big-M = this x each layer's initial max |w|")
    parser.add_argument("--costs", choices=["macs", "params"], default=None,
                        help="price each channel group's indicator by the MACs / params it saves "
                             "(PerspectiveRegularizer costs=); default: one price for all, as in the paper")
    parser.add_argument("--relative", action="store_true",
                        help="layer-relative penalty: each group's weights divided by its layer's RMS group norm "
                             "(PerspectiveRegularizer relative=True)")
    parser.add_argument("--score", choices=["norm", "relative_norm", "optimal_y"], default=None,
                        help="what the threshold runs on (default: relative_norm with --relative, else norm)")
    parser.add_argument("--tolerance", type=float, default=0.005, help="accepted validation accuracy drop (fraction)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", required=True, help="where to save the pruned model (torch.save)")
    parser.add_argument("--report", default=None, help="JSON report path (default: OUTPUT with .json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_spr(args: argparse.Namespace) -> int:
    """Run ``orprune spr`` with options parsed by :func:`add_spr_arguments`; returns the exit code."""
    from pathlib import Path

    from orprune import datasets
    from orprune.zoo import SmallCNN, resnet20

    if args.dataset == "digits" or (args.dataset == "auto" and not datasets.fashion_mnist_available(args.data_root)):
        (x, y), (test_x, test_y), name = datasets.load_digits("train"), datasets.load_digits("test"), "digits"
    else:
        x, y = datasets.load_fashion_mnist(args.data_root, "train")
        (test_x, test_y), name = datasets.load_fashion_mnist(args.data_root, "test"), "fashion-mnist"
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    n_val = min(args.val_size, len(y) // 4)
    val, rest = order[:n_val], order[n_val:][:args.train_size]
    torch.manual_seed(args.seed)
    if args.init is not None:
        model = torch.load(args.init, map_location="cpu", weights_only=False)
        if not isinstance(model, nn.Module):
            raise SystemExit(f"orprune spr: {args.init} does not hold a whole nn.Module")
    else:
        model = (resnet20 if args.model == "resnet20" else SmallCNN)(in_channels=x.shape[1])
    score = args.score or ("relative_norm" if args.relative else "norm")
    result = train_with_spr(
        model, x[rest], y[rest], x[val], y[val], alpha=args.alpha,
        lam=1.0 - args.alpha if args.lam is None else args.lam, strength=args.strength, m_scale=args.m_scale,
        tolerance=args.tolerance, score=score, epochs=args.epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
        seed=args.seed, progress=not args.quiet, log=None if args.quiet else print, costs=args.costs,
        relative=args.relative)
    p = result.pruning
    report = {
        "dataset": name, "train_images": len(rest), "val_images": n_val, "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs, "alpha": args.alpha, "lam": result.regularizer.lam,
        "strength": args.strength, "m_scale": args.m_scale, "costs": args.costs, "relative": args.relative,
        "score": score, "tolerance": p.tolerance,
        "threshold": p.threshold,
        "groups": len(p.norms), "groups_removed": p.n_removed,
        "removed_per_layer": {n: [r, t] for n, r, t in p.removed_per_layer},
        "macs_before": p.macs_before, "macs_after": p.macs_after,
        "params_before": p.params_before, "params_after": p.params_after,
        "val_accuracy_before": p.accuracy_before, "val_accuracy_after": p.accuracy_after,
        "val_accuracy_finetuned": result.accuracy_finetuned,
        "test_accuracy_trained": evaluate(result.trained, test_x, test_y),
        "test_accuracy_final": evaluate(result.model, test_x, test_y),
        "train_seconds": result.train_seconds, "finetune_seconds": result.finetune_seconds,
    }
    torch.save(result.model, args.output)
    report_path = Path(args.report or Path(args.output).with_suffix(".json"))
    report_path.write_text(json.dumps(report, indent=2))
    print(p.summary())
    print(f"test accuracy {report['test_accuracy_trained']:.4f} (trained) -> {report['test_accuracy_final']:.4f} "
          f"(final)\npruned model: {args.output}\nreport: {report_path}")
    return 0
