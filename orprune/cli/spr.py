"""``orprune spr``: train with the perspective regularizer, remove the groups below a threshold, save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from orprune.examples import datasets
from orprune.examples.zoo import SmallCNN, resnet20
from orprune.spr.training import DEFAULT_M_SCALE, DEFAULT_STRENGTH, train_with_spr
from orprune.training import evaluate

__all__ = ["add_spr_arguments", "run_spr"]


def add_spr_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``orprune spr``: train with SPR, threshold, remove, fine-tune, save."""
    parser.add_argument("--model", choices=["resnet20", "small_cnn"], default="resnet20",
                        help="architecture trained from scratch (orprune.examples.zoo)")
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
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="multiplier of the SPR term")
    parser.add_argument("--m-scale", type=float, default=DEFAULT_M_SCALE,
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
