"""``orprune prune``: prune a saved model on calibration data and save it with a JSON report."""

from __future__ import annotations

import argparse
import json

import torch

from orprune.cli._args import fraction, nonnegative_float, nonnegative_int, positive_int
from orprune.cli._data import DATA_HELP, load_data
from orprune.cli._io import UsageError, check_output_file, load_model
from orprune.cli._report import LOAD_HINT, accuracy_warnings, warn
from orprune.examples.datasets import load_named
from orprune.layer.solvers.registry import SOLVERS
from orprune.network.saving import save
from orprune.pipeline import Pruner
from orprune.training import batches, evaluate

__all__ = ["add_prune_arguments", "run_prune"]

PROG = "orprune prune"


def add_prune_arguments(prune: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``orprune prune``."""
    prune.add_argument("model", help="the model: a file from torch.save(model, path) or orprune.save")
    prune.add_argument("--model-module", metavar="MODULE", default=None,
                       help="FILE.py or module name defining the model's class, when it was defined in your "
                            "training script (its top-level code runs; keep training under `if __name__ == "
                            "\"__main__\":`)")
    data = prune.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", choices=["digits", "fashion-mnist"],
                      help="a built-in calibration (and --evaluate) dataset")
    data.add_argument("--data", metavar="SPEC", help=DATA_HELP)
    prune.add_argument("--eval-data", metavar="SPEC", default=None,
                       help="labelled test data for --evaluate with --data (same forms as --data; default: the "
                            "--dataset's test split)")
    prune.add_argument("--image-size", type=positive_int, default=None,
                       help="resize the images of a --data folder to N x N (default: keep; they must agree)")
    prune.add_argument("--image-mode", choices=["auto", "L", "RGB"], default="auto",
                       help="channels of --data images: L (1) or RGB (3); auto: L when all are grayscale")
    prune.add_argument("--data-root", default=None, help="a folder holding the Fashion-MNIST IDX files")
    prune.add_argument("--macs", type=fraction, default=None, help="fraction of MACs to keep, in (0, 1]")
    prune.add_argument("--params", type=fraction, default=None, help="fraction of parameters to keep, in (0, 1]")
    prune.add_argument("--latency", type=fraction, default=None,
                       help="fraction of the measured latency to keep, in (0, 1]: every pruned layer is timed at each "
                            "keep count on this machine first (cached), at --batch-size and --threads")
    prune.add_argument("--latency-rounds", type=nonnegative_int, default=3, metavar="N",
                       help="with --latency: measure the pruned model and re-solve with the tables' budget moved, up "
                            "to N times, until the measured latency meets the budget; 0 trusts the tables "
                            "(default: %(default)s)")
    prune.add_argument("--batch-size", type=positive_int, default=None,
                       help="batch size at which latency is measured (default 1); also reports the latency of a "
                            "--macs / --params pruning")
    prune.add_argument("--threads", type=positive_int, default=1,
                       help="torch threads while measuring latency (default: %(default)s)")
    prune.add_argument("--calibration", type=positive_int, default=1024, metavar="N",
                       help="calibration inputs (default: %(default)s)")
    prune.add_argument("--solver", choices=["auto", *SOLVERS], default="auto",
                       help="layer solver (default: %(default)s: exact on small layers, greedy beyond)")
    prune.add_argument("--allocation", choices=["milp", "uniform"], default="milp",
                       help="keep counts from the MILP, or one keep fraction for every layer (default: %(default)s)")
    prune.add_argument("--round-to", type=positive_int, default=1, metavar="N",
                       help="keep counts in multiples of N (8: CPU speed; default: %(default)s)")
    prune.add_argument("--errors", choices=["layer", "output"], default="layer",
                       help="what the allocation sums: layer reconstruction errors, or each unit's error of the "
                            "network output (slower fit, usually more accurate without fine-tuning; default: "
                            "%(default)s)")
    prune.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                       help="processes for the error curves (default: 1)")
    prune.add_argument("--output", "-o", required=True,
                       help="where to save the pruned model (orprune.save: loads with orprune.load(path, YourModel()))")
    prune.add_argument("--save-module", action="store_true",
                       help="save the whole module with torch.save(model) instead (loading then needs the class "
                            "and torch.load(path, weights_only=False))")
    prune.add_argument("--report", default=None, help="JSON report path (default: OUTPUT with .json)")
    prune.add_argument("--evaluate", action="store_true", help="measure test accuracy before and after")
    prune.add_argument("--tolerance", type=nonnegative_float, default=0.02,
                       help="with --evaluate, warn when accuracy drops by more than this (default: %(default)s)")
    prune.add_argument("--quiet", action="store_true", help="no progress bars")
    return prune


def _data(args: argparse.Namespace, split: str, spec: str | None, limit: int | None):
    if spec is None:
        images, labels, _ = load_named(args.dataset, args.data_root, split)
        return images, labels
    return load_data(spec, limit=limit, image_size=args.image_size, image_mode=args.image_mode)


def run_prune(args: argparse.Namespace) -> int:
    """Run ``orprune prune`` with options parsed by :func:`add_prune_arguments`; returns the exit code."""
    # everything checkable is checked before the model is loaded or any data read
    if args.macs is None and args.params is None and args.latency is None:
        raise UsageError("give a budget: --macs, --params and/or --latency (fractions in (0, 1])")
    if args.latency is not None and args.allocation == "uniform":
        raise UsageError("--latency needs --allocation milp")
    output = check_output_file(args.output, "--output")
    report_path = check_output_file(args.report or str(output.with_suffix(".json")), "--report")
    if report_path.resolve() == output.resolve():
        raise UsageError("--report and --output name the same file")
    eval_spec = args.eval_data if args.data is not None else None
    if args.evaluate and args.data is not None and args.eval_data is None:
        raise UsageError("--evaluate with --data needs --eval-data (labelled test inputs)")
    model, _ = load_model(args.model, args.model_module)
    images, _ = _data(args, "train", args.data, args.calibration)
    test = None
    if args.evaluate:
        test_x, test_y = _data(args, "test", eval_spec, None)
        if test_y is None:
            raise UsageError(f"--eval-data {args.eval_data} has no labels: give (inputs, labels) or class folders")
        test = (test_x, test_y)
    pruner = Pruner(solver=args.solver, round_to=args.round_to, errors=args.errors, n_jobs=args.jobs,
                    progress=not args.quiet)
    pruner.fit(model, list(batches(images, 128, args.calibration)))
    if args.latency is not None or args.batch_size is not None:
        pruner.fit_latency(batch_size=args.batch_size or 1, threads=args.threads)
    result = pruner.prune(macs=args.macs, params=args.params, latency=args.latency, allocation=args.allocation,
                          latency_rounds=args.latency_rounds)
    report = {**result.to_dict(), "allocation_errors": args.errors, "calibration_inputs": min(len(images),
              args.calibration), "data": args.data or args.dataset, "saved_as": "module" if args.save_module
              else "orprune.save", "load": "torch.load(path, weights_only=False)" if args.save_module else LOAD_HINT}
    lines = [result.summary()]
    if test is not None:
        before, after = evaluate(model, *test), evaluate(result.model, *test)
        report.update(accuracy_before=before, accuracy_after=after, test_inputs=len(test[1]))
        report["warnings"] = accuracy_warnings(test[1], before, after, args.tolerance)
        lines.append(f"test accuracy on {len(test[1])} inputs: {before:.4f} (before) -> {after:.4f} (after)")
    if args.save_module:
        torch.save(result.model, output)
    else:
        save(result.model, output, extra={"command": "orprune prune", "macs": args.macs, "params": args.params,
                                              "latency": args.latency})
    report_path.write_text(json.dumps(report, indent=2))
    print("\n".join(lines))
    for message in report.get("warnings", []):
        warn(PROG, message)
    print(f"pruned model: {output} (load: {report['load']})\nreport: {report_path}")
    return 0
