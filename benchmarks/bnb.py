"""The combinatorial branch and bound (``solver="bnb"``) beside ``exact`` and ``swap`` on the ResNet-20 units.

For every prunable unit of the trained ResNet-20 (``benchmarks.common.network_unit_problems``), keep
k = C/2 channels with ``swap`` (the incumbent both exact solvers start from), ``exact`` and ``bnb``, the
exact solvers with the time limit of their channel count (``--time-limit`` up to 32 channels,
``--time-limit-64`` beyond). Reports wall and CPU time (one BLAS thread), node counts, the root bounds
and, for units left uncertified, Knuth's estimate of the number of nodes ``bnb`` would need with the best
known incumbent. Writes ``benchmarks/results/bnb.md``.

Run from the repository root::

    python -m benchmarks.bnb --time-limit 60 --time-limit-64 120
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import orprune  # noqa: E402
from benchmarks.common import RESULTS_DIR, machine, network_unit_problems  # noqa: E402
from orprune.layer.solvers._perspective import perspective_split  # noqa: E402
from orprune.layer.solvers._tree_search import TreeSearch  # noqa: E402


def _timed(func):
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the time-limit warning: the gap is in the table
        result = func()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def tree_estimate(prob, k, incumbent, probes: int, seconds: float) -> tuple[float, float, float]:
    """Knuth's estimate of bnb's tree (relaxation at the nodes, as the default) with ``incumbent``."""
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    scale = float(np.mean(np.diag(H)))
    Hn, Bn = H / scale, prob.cross / np.sqrt(scale * prob.yy)
    engine = TreeSearch(Hn, Bn, prob.group_size, k, perspective_split(Hn, prob.group_size, "precision"),
                        evaluate=lambda mask: prob.objective(mask) / prob.yy, incumbent=incumbent, rel_gap=1e-4,
                        deadline=time.perf_counter() + min(seconds, 30.0))
    cpu = time.process_time()
    mean, error = engine.estimate_tree_size(probes)
    return mean, error, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds for units of at most 32 channels")
    parser.add_argument("--time-limit-64", type=float, default=120.0, help="seconds for wider units")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the (cached) ResNet-20")
    parser.add_argument("--min-channels", type=int, default=0, help="skip units with fewer channels")
    parser.add_argument("--skip-exact", action="store_true", help="do not run the `exact` solver")
    parser.add_argument("--probes", type=int, default=30, help="probes of the tree-size estimate (0: none)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "bnb.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layers = [layer for layer in network_unit_problems("resnet20", epochs=args.epochs, log=None)
              if layer.problem.n_channels >= args.min_channels]
    rows, details = [], []
    for layer in layers:
        prob = layer.problem
        C = prob.n_channels
        k = C // 2
        limit = args.time_limit if C <= 32 else args.time_limit_64
        print(f"{layer.name}: C = {C}, g = {prob.group_size}, limit {limit:g} s", flush=True)
        swap, swap_wall, swap_cpu = _timed(lambda: orprune.select(prob, k, solver="swap"))
        bnb, wall, cpu = _timed(lambda: orprune.select(prob, k, solver="bnb", time_limit=limit))
        exact = None
        if not args.skip_exact:
            exact, exact_wall, exact_cpu = _timed(lambda: orprune.select(prob, k, solver="exact", time_limit=limit))
        yy = prob.yy
        best = min(s.objective for s in (swap, bnb, exact) if s is not None)
        estimate = None
        if bnb.status != "optimal" and args.probes:
            incumbent = min((s for s in (swap, bnb, exact) if s is not None), key=lambda s: s.objective).mask
            estimate = tree_estimate(prob, k, incumbent, args.probes, limit)
        info = bnb.info

        def cell(sel, wall_time, cpu_time):
            if sel.status == "optimal":
                return f"optimal, {wall_time:.1f} s (CPU {cpu_time:.1f} s)"
            return f"gap {sel.gap:.1%} at {wall_time:.0f} s (CPU {cpu_time:.0f} s)"

        rows.append((layer.name, C, k, prob.group_size, best / yy, swap.objective / best - 1,
                     cell(exact, exact_wall, exact_cpu) if exact else "not run",
                     cell(bnb, wall, cpu), info.get("nodes", 0),
                     info.get("root_superset", np.nan) / yy, info.get("root_cheap_bound", np.nan) / yy,
                     info.get("root_relaxation", np.nan) / yy, estimate))
        details.append((layer.name, info.get("log", []), info.get("pruned"), info.get("fixed_in"),
                        info.get("fixed_out"), info.get("restarts")))
        print(f"  swap {swap.objective / yy:.5f}; bnb {bnb.status} gap {bnb.gap:.2%} nodes {info.get('nodes')} "
              f"wall {wall:.1f} cpu {cpu:.1f}" + (f"; exact {exact.status} gap {exact.gap:.2%}" if exact else "")
              + (f"; tree estimate {estimate[0]:.3g} +- {estimate[1]:.2g}" if estimate else ""), flush=True)
    write(args, rows, details, layers)


def write(args, rows, details, layers) -> None:
    command = "python -m benchmarks.bnb " + " ".join(sys.argv[1:])
    lines = [
        "# Combinatorial branch and bound (`solver=\"bnb\"`) on the ResNet-20 units", "",
        f"Produced by `{command.strip()}` on {time.strftime('%Y-%m-%d')} ({machine()}, "
        f"{platform.python_version()}, orprune {orprune.__version__}, one BLAS / torch thread, a 2-core machine "
        "shared with other jobs: wall times are inflated, CPU times are the process's own).", "",
        f"Units: `benchmarks.common.network_unit_problems(\"resnet20\", epochs={args.epochs})` "
        f"({layers[0].source if layers else ''}); k = C/2. Time limits: {args.time_limit:g} s up to 32 channels, "
        f"{args.time_limit_64:g} s beyond. Errors and bounds are divided by ‖Y‖². \"root superset\" is f(all "
        "channels); \"root cheap\" the best of the superset, removal and keep bounds at the root; \"root "
        "relaxation\" the perspective bound with the precision split. \"tree estimate\": Knuth's estimate "
        f"({args.probes} random probes) of the nodes bnb needs to close the gap with the best known incumbent.", "",
        "| unit | C | k | g | best known | swap vs best | exact | bnb | bnb nodes | root superset | root cheap | "
        "root relaxation | tree estimate (nodes) |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for (name, C, k, g, best, swap, exact, bnb, nodes, superset, cheap, relaxation, estimate) in rows:
        est = "-" if estimate is None else f"{estimate[0]:.2g} ± {estimate[1]:.1g} ({estimate[2]:.0f} s CPU)"
        lines.append(f"| {name} | {C} | {k} | {g} | {best:.5f} | {swap:+.2%} | {exact} | {bnb} | {nodes} | "
                     f"{superset:.5f} | {cheap:.5f} | {relaxation:.5f} | {est} |")
    lines += ["", "## Proof logs (bnb)", ""]
    for name, log, pruned, fixed_in, fixed_out, restarts in details:
        lines += [f"### {name}", "", f"pruned by: {pruned}; screening fixed {fixed_in} in, {fixed_out} out; "
                  f"{restarts} best-bound restarts", "", "```"] + list(log[:12]) + (
                      ["..."] + list(log[-4:]) if len(log) > 16 else list(log[12:])) + ["```", ""]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
