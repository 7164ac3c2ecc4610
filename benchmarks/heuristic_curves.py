"""Heuristics along whole error curves: how far greedy and swap are from the certified optimum.

For every prunable unit of the trained ResNet-20 small enough for ``solver="auto"`` to certify
(``AUTO_EXACT_MAX_CHANNELS``), every keep count k = 1..C-1: the exact solver with a time limit, the
``swap`` heuristic (greedy and backward elimination polished by 1-swap search: the exact solver's own
starting point) and ``greedy``. It answers two questions: what the certificate buys over the
heuristic start (the curves the allocation reads), and how much of ``Pruner(solver="auto")``'s time
goes to proving what the start already found (``Pruner(time_limit=...)``).
Writes ``benchmarks/results/heuristic_curves.md``.

Run from the repository root::

    python -m benchmarks.heuristic_curves --time-limit 10
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, machine, network_unit_problems  # noqa: E402
from orprune import select  # noqa: E402
from orprune.layer.selection import AUTO_EXACT_MAX_CHANNELS  # noqa: E402


def unit_rows(prob, time_limit: float) -> list[dict]:
    """One row per keep count: each solver's error and time, the exact status and gap."""
    rows = []
    for k in range(1, prob.n_channels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # time-limit warnings: the status is in the row
            exact = select(prob, k, solver="exact", time_limit=time_limit)
        swap = select(prob, k, solver="swap")
        greedy = select(prob, k, solver="greedy")
        best = min(exact.objective, swap.objective)
        rows.append({"k": k, "status": exact.status, "gap": exact.gap, "exact_time": exact.solve_time,
                     "swap": swap.objective / best - 1, "swap_time": swap.solve_time,
                     "greedy": greedy.objective / best - 1, "greedy_time": greedy.solve_time,
                     "exact": exact.objective / best - 1})
    return rows


def summary(name: str, n_channels: int, rows: list[dict]) -> str:
    certified = sum(r["status"] == "optimal" for r in rows)
    at_best = sum(r["swap"] <= 1e-9 for r in rows)
    return (f"| {name} | {n_channels} | {certified}/{len(rows)} | {sum(r['exact_time'] for r in rows):.1f} | "
            f"{at_best}/{len(rows)} | {100 * max(r['swap'] for r in rows):.2f}% | "
            f"{sum(r['swap_time'] for r in rows):.1f} | {100 * np.mean([r['greedy'] for r in rows]):.2f}% | "
            f"{100 * max(r['greedy'] for r in rows):.2f}% |")


def detail(name: str, rows: list[dict]) -> str:
    lines = [f"### {name}", "", "| k | exact status | exact gap | exact (s) | swap vs best | swap (s) | greedy vs best |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r['status']} | {100 * r['gap']:.2f}% | {r['exact_time']:.2f} | {100 * r['swap']:+.2f}% | "
              f"{r['swap_time']:.2f} | {100 * r['greedy']:+.2f}% |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per exact solve")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "heuristic_curves.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.heuristic_curves " + " ".join(argv if argv is not None else sys.argv[1:])

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # one BLAS thread: a shared 2-core machine
        layers = [layer for layer in network_unit_problems(args.model, log=None)
                  if layer.n_channels <= AUTO_EXACT_MAX_CHANNELS]
        results = []
        for layer in layers:
            print(f"{layer.name}: C = {layer.n_channels}", flush=True)
            results.append((layer, unit_rows(layer.problem, args.time_limit)))
    total = sum(len(rows) for _, rows in results)
    at_best = sum(r["swap"] <= 1e-9 for _, rows in results for r in rows)
    exact_time = sum(r["exact_time"] for _, rows in results for r in rows)
    swap_time = sum(r["swap_time"] for _, rows in results for r in rows)
    lines = [
        "# Heuristics along whole error curves",
        "",
        f"Produced by `{command.strip()}` on {time.strftime('%Y-%m-%d')} ({machine()}, one BLAS "
        "thread, machine shared with other jobs: times are indicative).",
        "",
        f"Every unit of the trained {args.model} with at most {AUTO_EXACT_MAX_CHANNELS} channels (those "
        f"`solver=\"auto\"` certifies), every keep count; the exact solver gets {args.time_limit:g} s per count. "
        "\"vs best\": error relative to the lower of exact's and swap's (the certified optimum where exact is optimal). "
        "`swap` is the exact solver's own starting point, so exact's time beyond it is spent proving.",
        "",
        f"**Overall:** swap found the best known mask at {at_best} of {total} keep counts, in {swap_time:.0f} s in "
        f"total against {exact_time:.0f} s for the exact solves.",
        "",
        "| unit | C | exact certified | exact time (s) | swap = best | swap worst | swap time (s) | greedy mean | greedy worst |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [summary(layer.name, layer.n_channels, rows) for layer, rows in results]
    lines.append("")
    lines += [detail(layer.name, rows) for layer, rows in results]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print(args.output.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
