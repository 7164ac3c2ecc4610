"""Coverage of issue 21: which networks each library prunes to a MACs target, side by side.

Every case of ``orprune.examples.coverage_zoo`` (hand-written DenseNet / ResNeXt / Inception / ShuffleNetV2 /
fused-norm / channel-norm / token-MLP / C2f (chunk) networks and ``transformers`` vision models at tiny widths, random initialisation) is pruned to ``--macs``
of its MACs by orprune (greedy curves, MILP allocation, sequential least-squares refit; the best reachable
fraction with the reason when the target is out of reach) and by torch-pruning's magnitude pruner
(uniform ratio: a grid, then bisection; classifier ignored). Reported: success, MACs reached, seconds, and for
orprune the prunable units / groups left alone and ``max |pruned - masked| / max |masked|``.

Run ``python -m benchmarks.coverage`` (``--help`` for the settings); writes ``benchmarks/results/coverage.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import warnings
from datetime import date

import torch

from benchmarks.common import RESULTS_DIR, machine
from orprune.examples.coverage import CoverageRecord, orprune_coverage, torch_pruning_coverage
from orprune.examples.coverage_zoo import CASES, TRANSFORMERS_CASES


def _macs(record: CoverageRecord) -> str:
    return "-" if record.macs is None else f"{100 * record.macs:.1f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--macs", type=float, default=0.5, help="MACs fraction to keep")
    parser.add_argument("--cases", default="all", help="comma-separated case names (default: every case)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=str(RESULTS_DIR / "coverage.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.coverage " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    cases = dict(CASES)
    if importlib.util.find_spec("transformers") is not None:
        cases.update(TRANSFORMERS_CASES)
    names = list(cases) if args.cases == "all" else args.cases.split(",")
    unknown = sorted(set(names) - set(cases))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(cases)}")
    rows, notes = [], []
    for name in names:
        model, batches = cases[name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = orprune_coverage(model, batches, macs=args.macs)
            theirs = torch_pruning_coverage(model, batches, macs=args.macs)
        target = "" if ours.target == args.macs else f" (best reachable {100 * ours.target:.1f}%)"
        diff = "-" if ours.max_abs_difference is None else f"{ours.max_abs_difference:.1e}"
        rows.append(f"| {name} | {'yes' if ours.success else 'no'}{target} | {_macs(ours)} | {ours.time:.1f} | "
                    f"{ours.units} / {ours.excluded} | {diff} | {'yes' if theirs.success else 'no'} | "
                    f"{_macs(theirs)} | {theirs.time:.1f} |")
        for who, rec in (("orprune", ours), ("torch-pruning", theirs)):
            if rec.reason:
                notes.append(f"- {name}, {who}: {rec.reason}")
        print(rows[-1], flush=True)
    lines = [
        f"Command: `{command}`",
        "",
        f"{date.today().isoformat()}, {machine()}, torch {torch.__version__}, {args.threads} thread(s). "
        f"Target: {100 * args.macs:.0f}% of the MACs (torch-pruning's count), random initialisation.",
        "",
        "| network | orprune meets target | orprune MACs | orprune s | units / left alone | pruned vs masked | "
        "torch-pruning meets target | torch-pruning MACs | torch-pruning s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Reasons and errors:",
        "",
        *(notes or ["- none"]),
        "",
    ]
    with open(args.output, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
