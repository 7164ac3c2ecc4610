"""Command line: ``orprune demo``, ``orprune prune``, ``orprune spr`` and ``orprune trp``.

The top of the package: it may import every stage. Each command lives in its own module
(:mod:`orprune.cli.prune`, :mod:`orprune.cli.spr`, :mod:`orprune.cli.trp`; the demo is :mod:`orprune.examples.demo`).
A mistake of the user (a bad option, a missing or unreadable file, data that does not fit the model)
is one line on stderr and exit status 2; Ctrl-C is one line and status 130; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from orprune.cli._args import fractions, positive_int
from orprune.cli._io import UsageError
from orprune.cli.prune import add_prune_arguments, run_prune
from orprune.cli.spr import add_spr_arguments, run_spr
from orprune.cli.trp import add_trp_arguments, run_trp
from orprune.examples.demo import run_demo
from orprune.layer.solvers.registry import SOLVERS

__all__ = ["main"]

#: Exceptions that mean "your input is wrong", not "orprune is broken".
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, pickle.UnpicklingError)


class _Parser(argparse.ArgumentParser):
    """Errors in one line (not the whole usage) and status 2, as every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = _Parser(prog="orprune", description="Channel pruning as a mixed-integer program.",
                                     parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,prune,spr,trp}", parser_class=_Parser)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    demo = sub.add_parser("demo", parents=[debug], formatter_class=defaults,
                          help="train a small CNN, prune it at several MACs budgets, print a table")
    demo.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto",
                      help="auto: Fashion-MNIST when installed (apt-get install dataset-fashion-mnist), else digits")
    demo.add_argument("--data-root", default=None, help="a torchvision-style root holding FashionMNIST/raw")
    demo.add_argument("--macs", type=fractions, default=[0.7, 0.5, 0.3], help="MACs fractions to keep, comma-separated")
    demo.add_argument("--epochs", type=float, default=None, help="training epochs (default: 3 fashion-mnist, 20 digits)")
    demo.add_argument("--calibration", type=positive_int, default=1024, help="calibration images")
    demo.add_argument("--solver", choices=["auto", *SOLVERS], default="auto", help="layer solver")
    demo.add_argument("--out", default="orprune-demo", help="folder for the report and plot")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    add_prune_arguments(sub.add_parser("prune", parents=[debug], help="prune a saved model on calibration data"))
    add_spr_arguments(sub.add_parser(
        "spr", parents=[debug], formatter_class=defaults,
        help="train with the perspective regularizer, remove channels below a threshold, save"))
    add_trp_arguments(sub.add_parser(
        "trp", parents=[debug], formatter_class=defaults,
        help="train with Trained Rank Pruning, split each layer in two at its energy rank, save"))
    return parser


def _one_line_warnings(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    """Warnings without orprune's source line: ``orprune: warning: ...``."""
    print(f"orprune: warning: {message}", file=sys.stderr, flush=True)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown: freeing torch's modules takes seconds on a loaded machine, and
    after Ctrl-C there is nothing left to save. The worker pool is already stopped; collecting it first
    unlinks its semaphores, so the resource tracker has nothing to report."""
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for the user's mistakes, 130 for Ctrl-C)."""
    args = _parser().parse_args(argv)
    prog = f"orprune {args.command}"
    run = {"demo": run_demo, "spr": run_spr, "prune": run_prune, "trp": run_trp}[args.command]
    show = warnings.showwarning
    if not args.debug:
        warnings.showwarning = _one_line_warnings
    try:
        return run(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        if argv is None:  # the program itself (not main() called from Python): leave now
            _exit_now(130)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and "
              "please report it)", file=sys.stderr, flush=True)
        return 1
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
