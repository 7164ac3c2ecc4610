"""``orprune spr``: train with the perspective regularizer, remove the groups below a threshold, save."""

from __future__ import annotations

import argparse
import json

import torch

from orprune.cli._args import nonnegative_float, positive_float, positive_int
from orprune.cli._io import UsageError, check_output_file
from orprune.cli._report import LOAD_HINT, accuracy_warnings, warn
from orprune.cli._training import add_training_source, load_training_source, starting_model
from orprune.network.saving import save
from orprune.spr.training import DEFAULT_M_SCALE, DEFAULT_STRENGTH, train_with_spr
from orprune.training import evaluate

__all__ = ["add_spr_arguments", "run_spr"]

PROG = "orprune spr"


def add_spr_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``orprune spr``: train with SPR, threshold, remove, fine-tune, save."""
    add_training_source(parser, model="resnet20", train_size_help="training images (default: all not held out)")
    parser.add_argument("--val-size", type=positive_int, default=5000, help="training images held out for the threshold")
    parser.add_argument("--epochs", type=positive_float, default=2)
    parser.add_argument("--finetune-epochs", type=nonnegative_float, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="SPR quadratic weight")
    parser.add_argument("--lam", type=float, default=None, help="SPR indicator cost (default 1 - alpha)")
    parser.add_argument("--strength", type=nonnegative_float, default=DEFAULT_STRENGTH, help="multiplier of the SPR term")
    parser.add_argument("--m-scale", type=positive_float, default=DEFAULT_M_SCALE,
                        help="big-M = this x each layer's initial max |w|")
    parser.add_argument("--costs", choices=["macs", "params"], default=None,
                        help="price each channel group's indicator by the MACs / params it saves "
                             "(PerspectiveRegularizer costs=); default: one price for all, as in the paper")
    parser.add_argument("--relative", action="store_true",
                        help="layer-relative penalty: each group's weights divided by its layer's RMS group norm "
                             "(PerspectiveRegularizer relative=True)")
    parser.add_argument("--score", choices=["norm", "relative_norm", "optimal_y"], default=None,
                        help="what the threshold runs on (default: relative_norm with --relative, else norm)")
    parser.add_argument("--tolerance", type=nonnegative_float, default=0.005, help="accepted validation accuracy drop (fraction)")
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", required=True, help="where to save the pruned model (orprune.save: loads with orprune.load(path, YourModel()))")
    parser.add_argument("--report", default=None, help="JSON report path (default: OUTPUT with .json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_spr(args: argparse.Namespace) -> int:
    """Run ``orprune spr`` with options parsed by :func:`add_spr_arguments`; returns the exit code."""
    if not 0 < args.alpha <= 1:
        raise UsageError(f"--alpha must lie in (0, 1], got {args.alpha}")
    if args.lam is not None and args.lam < 0:
        raise UsageError(f"--lam must be >= 0, got {args.lam}")
    output = check_output_file(args.output, "--output")
    report_path = check_output_file(args.report or str(output.with_suffix(".json")), "--report")
    init, (x, y), (test_x, test_y), name = load_training_source(args, PROG)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
    n_val = min(args.val_size, len(y) // 4)
    val, rest = order[:n_val], order[n_val:][:args.train_size]
    print(f"dataset: {name} ({len(rest)} training, {n_val} validation, {len(test_y)} test images)", flush=True)
    torch.manual_seed(args.seed)
    model = starting_model(args, init, x.shape[1])
    score = args.score or ("relative_norm" if args.relative else "norm")
    result = train_with_spr(
        model, x[rest], y[rest], x[val], y[val], alpha=args.alpha,
        lam=1.0 - args.alpha if args.lam is None else args.lam, strength=args.strength, m_scale=args.m_scale,
        tolerance=args.tolerance, score=score, epochs=args.epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
        seed=args.seed, progress=not args.quiet, log=None, costs=args.costs,
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
    report["warnings"] = accuracy_warnings(test_y, report["test_accuracy_trained"], report["test_accuracy_final"],
                                           args.tolerance, before_what="trained model (before removing groups)")
    if p.n_removed == 0:
        report["warnings"].append("no channel group was removed: train longer or with a larger --strength, or "
                                  "raise --tolerance")
    report["load"] = LOAD_HINT
    save(result.model, output, extra={"command": "orprune spr", "dataset": name})
    report_path.write_text(json.dumps(report, indent=2))
    print(p.summary())
    print(f"test accuracy on {len(test_y)} {name} images: {report['test_accuracy_trained']:.4f} (trained) -> "
          f"{report['test_accuracy_final']:.4f} (final)")
    for message in report["warnings"]:
        warn(PROG, message)
    print(f"pruned model: {output} (load: {LOAD_HINT})\nreport: {report_path}")
    return 0
