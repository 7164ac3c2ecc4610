"""Command line: ``orprune demo``, ``orprune prune`` and ``orprune spr``.

The top of the package: it may import every stage. Each command lives in its own module
(:mod:`orprune.cli.prune`, :mod:`orprune.cli.spr`; the demo is :mod:`orprune.examples.demo`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from orprune.cli._args import fractions
from orprune.cli.prune import add_prune_arguments, run_prune
from orprune.cli.spr import add_spr_arguments, run_spr
from orprune.examples.demo import run_demo

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orprune", description="Channel pruning as a mixed-integer program.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small CNN, prune it at several MACs budgets, print a table")
    demo.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto",
                      help="auto: Fashion-MNIST when installed (apt-get install dataset-fashion-mnist), else digits")
    demo.add_argument("--data-root", default=None, help="a torchvision-style root holding FashionMNIST/raw")
    demo.add_argument("--macs", type=fractions, default=[0.7, 0.5, 0.3], help="MACs fractions to keep")
    demo.add_argument("--epochs", type=float, default=None, help="training epochs (default by dataset)")
    demo.add_argument("--calibration", type=int, default=1024, help="calibration images")
    demo.add_argument("--solver", default="auto")
    demo.add_argument("--out", default="orprune-demo", help="folder for the report and plot")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    add_prune_arguments(sub.add_parser("prune", help="prune a saved model (torch.save of the whole module)"))
    add_spr_arguments(sub.add_parser(
        "spr", help="train with the perspective regularizer, remove channels below a threshold, save"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "spr":
        return run_spr(args)
    return run_prune(args)


if __name__ == "__main__":
    sys.exit(main())
