"""``orprune prune``: prune a saved model on calibration data and save it with a JSON report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from orprune.examples.datasets import load_named
from orprune.pipeline import Pruner
from orprune.training import batches, evaluate

__all__ = ["add_prune_arguments", "run_prune"]


def add_prune_arguments(prune: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``orprune prune``."""
    prune.add_argument("model", help="path of a model saved with torch.save(model, path)")
    prune.add_argument("--dataset", choices=["digits", "fashion-mnist"], required=True,
                       help="calibration data (and evaluation, when --evaluate)")
    prune.add_argument("--data-root", default=None)
    prune.add_argument("--macs", type=float, default=None, help="fraction of MACs to keep, in (0, 1]")
    prune.add_argument("--params", type=float, default=None, help="fraction of parameters to keep, in (0, 1]")
    prune.add_argument("--latency", type=float, default=None,
                       help="fraction of the measured latency to keep, in (0, 1]: every pruned layer is timed at each "
                            "keep count on this machine first (cached), at --batch-size and --threads")
    prune.add_argument("--batch-size", type=int, default=None,
                       help="batch size at which latency is measured (default 1); also reports the latency of a "
                            "--macs / --params pruning")
    prune.add_argument("--threads", type=int, default=1, help="torch threads while measuring latency")
    prune.add_argument("--calibration", type=int, default=1024)
    prune.add_argument("--solver", default="auto")
    prune.add_argument("--allocation", choices=["milp", "uniform"], default="milp",
                       help="keep counts from the MILP, or one keep fraction for every layer")
    prune.add_argument("--round-to", type=int, default=1, help="keep counts in multiples of this (8: CPU speed)")
    prune.add_argument("--errors", choices=["layer", "output"], default="layer",
                       help="what the allocation sums: layer reconstruction errors, or each unit's error of the "
                            "network output (slower fit, usually more accurate without fine-tuning)")
    prune.add_argument("--jobs", type=int, default=None, help="processes for the error curves")
    prune.add_argument("--output", "-o", required=True, help="where to save the pruned model")
    prune.add_argument("--report", default=None, help="JSON report path (default: OUTPUT with .json)")
    prune.add_argument("--evaluate", action="store_true", help="report test accuracy before and after")
    prune.add_argument("--quiet", action="store_true")
    return prune


def run_prune(args: argparse.Namespace) -> int:
    """Run ``orprune prune`` with options parsed by :func:`add_prune_arguments`; returns the exit code."""
    if args.macs is None and args.params is None and args.latency is None:
        raise SystemExit("orprune prune: give --macs, --params and/or --latency")
    model = torch.load(args.model, map_location="cpu", weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"orprune prune: {args.model} does not hold a whole nn.Module (save it with torch.save(model, path))")
    images, labels, _ = load_named(args.dataset, args.data_root, "train")
    pruner = Pruner(solver=args.solver, round_to=args.round_to, errors=args.errors, n_jobs=args.jobs,
                    progress=not args.quiet)
    pruner.fit(model, list(batches(images, 128, args.calibration)))
    if args.latency is not None or args.batch_size is not None:
        pruner.fit_latency(batch_size=args.batch_size or 1, threads=args.threads)
    result = pruner.prune(macs=args.macs, params=args.params, latency=args.latency, allocation=args.allocation)
    torch.save(result.model, args.output)
    report = {**result.to_dict(), "allocation_errors": args.errors}
    if args.evaluate:
        test_x, test_y, _ = load_named(args.dataset, args.data_root, "test")
        report["accuracy_before"] = evaluate(model, test_x, test_y)
        report["accuracy_after"] = evaluate(result.model, test_x, test_y)
    report_path = Path(args.report or Path(args.output).with_suffix(".json"))
    report_path.write_text(json.dumps(report, indent=2))
    print(result.summary())
    print(f"pruned model: {args.output}\nreport: {report_path}")
    return 0
