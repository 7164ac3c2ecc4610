"""``orprune trp``: train with Trained Rank Pruning (nuclear norm, periodic energy truncation), decompose, save."""

from __future__ import annotations

import argparse
import json

import torch

from orprune.cli._args import nonnegative_float, positive_float, positive_int
from orprune.cli._io import UsageError, check_output_file
from orprune.cli._report import accuracy_warnings, warn
from orprune.cli._training import add_training_source, load_training_source, starting_model
from orprune.training import batches, evaluate
from orprune.trp.training import train_with_trp

__all__ = ["add_trp_arguments", "run_trp"]

PROG = "orprune trp"
#: How to load what ``orprune trp`` saves: the whole module (its layers are now pairs of thinner layers).
TRP_LOAD_HINT = "torch.load(path, weights_only=False) (the whole module; orprune must be importable)"


def add_trp_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``orprune trp``: train with TRP, decompose every layer at its energy rank, save."""
    add_training_source(parser, model="small_cnn", train_size_help="training images (default: all)")
    parser.add_argument("--epochs", type=positive_float, default=5)
    parser.add_argument("--nuclear", type=nonnegative_float, default=1e-3, help="weight of the nuclear norm in the loss")
    parser.add_argument("--energy", type=positive_float, default=0.9,
                        help="truncation keeps this share of each layer's squared singular values, in (0, 1]")
    parser.add_argument("--period", type=positive_int, default=20, help="optimizer steps between truncations")
    parser.add_argument("--calibration", type=int, default=0,
                        help="decompose with the optimal maps of each layer's rank on this many training images "
                             "(orprune.select_rank); 0: the SVD of the weights, as TRP")
    parser.add_argument("--ignore-classifier", action="store_true", help="leave the last Linear layer whole")
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", required=True,
                        help=f"where to save the decomposed model (load: {TRP_LOAD_HINT})")
    parser.add_argument("--report", default=None, help="JSON report path (default: OUTPUT with .json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_trp(args: argparse.Namespace) -> int:
    """Run ``orprune trp`` with options parsed by :func:`add_trp_arguments`; returns the exit code."""
    if not 0 < args.energy <= 1:
        raise UsageError(f"--energy must lie in (0, 1], got {args.energy}")
    if args.calibration < 0:
        raise UsageError(f"--calibration must be >= 0 images, got {args.calibration}")
    output = check_output_file(args.output, "--output")
    report_path = check_output_file(args.report or str(output.with_suffix(".json")), "--report")
    init, (x, y), (test_x, test_y), name = load_training_source(args, PROG)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[:args.train_size]
    x, y = x[order], y[order]
    print(f"dataset: {name} ({len(y)} training, {len(test_y)} test images)", flush=True)
    torch.manual_seed(args.seed)
    model = starting_model(args, init, x.shape[1])
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ignored = linears[-1:] if args.ignore_classifier else []
    calibration = list(batches(x, 128, args.calibration)) if args.calibration else None
    result = train_with_trp(model, x, y, epochs=args.epochs, nuclear=args.nuclear, energy=args.energy,
                            period=args.period, ignored_layers=ignored, calibration=calibration, lr=args.lr,
                            seed=args.seed, flip=False, threads=1, progress=not args.quiet)
    report = {
        "dataset": name, "train_images": len(y), "epochs": args.epochs, "nuclear": args.nuclear,
        "energy": args.energy, "period": args.period, "lr": args.lr, "ignored_layers": ignored,
        "decomposition": "select_rank" if calibration else "svd", "calibration_images": args.calibration,
        "ranks": result.ranks,
        "macs_before": result.macs_before, "macs_after": result.macs_after,
        "params_before": result.params_before, "params_after": result.params_after,
        "test_accuracy_trained": evaluate(result.trained, test_x, test_y),
        "test_accuracy_final": evaluate(result.model, test_x, test_y),
        "train_seconds": result.train_seconds,
    }
    report["warnings"] = accuracy_warnings(test_y, None, report["test_accuracy_trained"], 0.0,
                                           what="TRP-trained (before decomposition)")
    report["warnings"] += accuracy_warnings(test_y, report["test_accuracy_trained"], report["test_accuracy_final"],
                                            0.005, what="decomposed", before_what="TRP-trained model")
    if result.macs_after >= result.macs_before:
        report["warnings"].append("no layer was decomposed (no energy rank saves MACs): lower --energy, raise "
                                  "--nuclear, or train longer")
    report["load"] = TRP_LOAD_HINT
    torch.save(result.model, output)
    report_path.write_text(json.dumps(report, indent=2))
    print(f"MACs {result.macs_before:,} -> {result.macs_after:,} ({result.macs_after / result.macs_before:.1%}), "
          f"params {result.params_before:,} -> {result.params_after:,}")
    print(f"test accuracy on {len(test_y)} {name} images: {report['test_accuracy_trained']:.4f} (TRP-trained) -> "
          f"{report['test_accuracy_final']:.4f} (decomposed)")
    for message in report["warnings"]:
        warn(PROG, message)
    print(f"decomposed model: {output} (load: {TRP_LOAD_HINT})\nreport: {report_path}")
    return 0
