"""Command line: ``orprune demo``, ``orprune prune`` and ``orprune spr``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orprune", description="Channel pruning as a mixed-integer program.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small CNN, prune it at several MACs budgets, print a table")
    demo.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto",
                      help="auto: Fashion-MNIST when installed (apt-get install dataset-fashion-mnist), else digits")
    demo.add_argument("--data-root", default=None, help="a torchvision-style root holding FashionMNIST/raw")
    demo.add_argument("--macs", type=_fractions, default=[0.7, 0.5, 0.3], help="MACs fractions to keep")
    demo.add_argument("--epochs", type=float, default=None, help="training epochs (default by dataset)")
    demo.add_argument("--calibration", type=int, default=1024, help="calibration images")
    demo.add_argument("--solver", default="auto")
    demo.add_argument("--out", default="orprune-demo", help="folder for the report and plot")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    prune = sub.add_parser("prune", help="prune a saved model (torch.save of the whole module)")
    prune.add_argument("model", help="path of a model saved with torch.save(model, path)")
    prune.add_argument("--dataset", choices=["digits", "fashion-mnist"], required=True,
                       help="calibration data (and evaluation, when --evaluate)")
    prune.add_argument("--data-root", default=None)
    prune.add_argument("--macs", type=float, default=None, help="fraction of MACs to keep, in (0, 1]")
    prune.add_argument("--params", type=float, default=None, help="fraction of parameters to keep, in (0, 1]")
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

    from orprune.spr_training import add_spr_arguments

    add_spr_arguments(sub.add_parser(
        "spr", help="train with the perspective regularizer, remove channels below a threshold, save"))
    return parser


def _load_data(name: str, root: str | None, split: str):
    from orprune import datasets

    if name == "digits":
        images, labels = datasets.load_digits(split)
        return images, labels, "digits"
    if name == "fashion-mnist":
        images, labels = datasets.load_fashion_mnist(root, split=split)
        return images, labels, "fashion-mnist"
    return datasets.load_default(split, root=root)


def _cmd_prune(args: argparse.Namespace) -> int:
    import torch

    import orprune
    from orprune.training import batches, evaluate

    if args.macs is None and args.params is None:
        raise SystemExit("orprune prune: give --macs and/or --params")
    model = torch.load(args.model, map_location="cpu", weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"orprune prune: {args.model} does not hold a whole nn.Module (save it with torch.save(model, path))")
    images, labels, _ = _load_data(args.dataset, args.data_root, "train")
    pruner = orprune.Pruner(solver=args.solver, round_to=args.round_to, errors=args.errors, n_jobs=args.jobs,
                            progress=not args.quiet)
    pruner.fit(model, list(batches(images, 128, args.calibration)))
    result = pruner.prune(macs=args.macs, params=args.params, allocation=args.allocation)
    torch.save(result.model, args.output)
    report = {**result.to_dict(), "allocation_errors": args.errors}
    if args.evaluate:
        test_x, test_y, _ = _load_data(args.dataset, args.data_root, "test")
        report["accuracy_before"] = evaluate(model, test_x, test_y)
        report["accuracy_after"] = evaluate(result.model, test_x, test_y)
    report_path = Path(args.report or Path(args.output).with_suffix(".json"))
    report_path.write_text(json.dumps(report, indent=2))
    print(result.summary())
    print(f"pruned model: {args.output}\nreport: {report_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from orprune.demo import run_demo

        return run_demo(args)
    if args.command == "spr":
        from orprune.spr_training import run_spr

        return run_spr(args)
    return _cmd_prune(args)


if __name__ == "__main__":
    sys.exit(main())
