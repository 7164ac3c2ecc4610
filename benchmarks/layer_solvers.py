"""Layer solvers on real layers: reconstruction error against the best known / certified optimum.

For the convs of the trained small CNN whose input has C = 16, 32, 64 channels (g = 9), keep
k = C/2 channels with every registered solver, plus the perspective solver with the precision
split, its unpolished top-k rounding, and SCIP solving the indicator MIQP of
:mod:`orprune.layer.milp_model` (warm-started with greedy, same time limit). Writes
``benchmarks/results/layer_solvers.md``.

Run from the repository root::

    python -m benchmarks.layer_solvers --time-limit 120
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orprune  # noqa: E402
from benchmarks.common import RESULTS_DIR, machine, network_unit_problems, real_layer_problems  # noqa: E402
from orprune.layer.problem import LayerProblem  # noqa: E402


@dataclass
class Row:
    solver: str
    status: str
    objective: float | None
    bound: float | None
    time: float
    note: str = ""


def _run(label: str, func, note: str = "") -> Row:
    start = time.perf_counter()
    try:
        sel = func()
    except Exception as exc:  # a failing solver is a result, not a crash of the benchmark
        traceback.print_exc()
        return Row(label, "error", None, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:120])
    return Row(label, sel.status, sel.objective, sel.bound, sel.solve_time, note)


def solve_layer(prob: LayerProblem, k: int, time_limit: float, scip_max_terms: float, log) -> list[Row]:
    rows = []
    for name in orprune.available_solvers():
        log(f"  {name} ...")
        row = _run(name, lambda: orprune.select(prob, k, solver=name, time_limit=time_limit))
        rows.append(row)
        if name == "perspective" and row.status != "error":
            sel = orprune.select(prob, k, solver="perspective", time_limit=time_limit, polish=False)
            rows.append(Row("perspective, top-k only", sel.status, sel.objective, sel.bound, sel.solve_time,
                            "no swap polish"))
    log("  backward elimination ...")
    rows.append(_run("greedy, backward elimination", lambda: _backward(prob, k), "drop the cheapest channel, C - k times"))
    log("  perspective (precision split) ...")
    rows.append(_run("perspective, precision split",
                     lambda: orprune.select(prob, k, solver="perspective", time_limit=time_limit,
                                            separable="precision")))
    terms = prob.n_features * (prob.n_features + 1) / 2 * prob.n_outputs
    if terms > scip_max_terms:
        rows.append(Row("SCIP (MIQP)", "not run", None, None, 0.0,
                        f"{terms / 1e6:.1f} M quadratic terms: model too large to build in Python"))
    else:
        from orprune.layer.milp_model import solve_scip
        from orprune.layer.solvers.greedy import greedy_path

        log("  SCIP ...")
        warm = greedy_path(prob, k)[0]
        row = _run("SCIP (MIQP)", lambda: solve_scip(prob, k, time_limit=time_limit, warm_start=warm),
                   "greedy warm start; time includes model building")
        rows.append(row)
    return rows


def _backward(prob: LayerProblem, k: int):
    from orprune.layer.solvers.local_search import backward_elimination
    from orprune.layer.solvers.registry import heuristic_selection

    start = time.perf_counter()
    return heuristic_selection(prob, backward_elimination(prob, k), "backward", start)


def summary_table(results: list[tuple[str, LayerProblem, int, list[Row]]]) -> str:
    """One line per layer: each solver's error relative to the best known, and the exact solver's state."""
    labels = [r.solver for r in results[0][3]]
    lines = ["Summary: each solver column is the error relative to the best known (the certified optimum where the "
             "exact solver column says optimal).", "",
             "| layer | C | k | best known / ‖Y‖² | exact solver | " + " | ".join(labels) + " |",
             "|---|---:|---:|---:|---|" + "---:|" * len(labels)]
    for name, prob, k, rows in results:
        best = min(r.objective for r in rows if r.objective is not None)
        exact = next((r for r in rows if r.solver == "exact"), None)
        if exact is None or exact.objective is None:
            state = "-"
        elif exact.status == "optimal":
            state = f"optimal, {exact.time:.1f} s"
        else:
            state = f"gap {100 * (exact.objective - exact.bound) / exact.objective:.1f}% at {exact.time:.0f} s"
        cells = ["-" if r.objective is None else f"{100 * (r.objective / best - 1):+.1f}%" for r in rows]
        lines.append(f"| {name} | {prob.n_channels} | {k} | {best / prob.yy:.5f} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, scale: float, digits: int = 5) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def layer_table(name: str, prob: LayerProblem, k: int, rows: list[Row], source: str, n_samples: int) -> str:
    yy = prob.yy
    solved = [r for r in rows if r.objective is not None]
    best = min(r.objective for r in solved)
    best_bound = max([r.bound for r in solved if r.bound is not None] + [prob.full_objective])
    certified = any(r.status == "optimal" and r.objective <= best * (1 + 1e-9) for r in solved)
    lines = [
        f"### {name}: C = {prob.n_channels}, k = {k}, g = {prob.group_size}, n_out = {prob.n_outputs}, "
        f"N = {n_samples}",
        "",
        f"{source}; ridge = {prob.ridge:.4g} (1e-4 x mean diagonal). Errors are divided by ‖Y‖²; "
        f"f(all channels) = {prob.full_objective / yy:.2e}.",
        f"Best known = {best / yy:.5f} ({'certified optimal' if certified else 'not certified'}); "
        f"best proven bound = {best_bound / yy:.5f}; remaining gap = "
        f"{100 * (best - best_bound) / best:.1f}%.",
        "",
        "| solver | status | error / ‖Y‖² | vs best known | bound / ‖Y‖² | own gap | time (s) | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rel = "-" if r.objective is None else f"{100 * (r.objective / best - 1):+.2f}%"
        gap = "-" if r.objective is None or r.bound is None else max(r.objective - r.bound, 0) / r.objective
        gap = gap if isinstance(gap, str) else (">100%" if gap > 1 else f"{100 * gap:.1f}%")
        lines.append(f"| {r.solver} | {r.status} | {_fmt(r.objective, yy)} | {rel} | {_fmt(r.bound, yy)} | "
                     f"{gap} | {r.time:.2f} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per exact / SCIP solve")
    parser.add_argument("--model", choices=["small_cnn", "resnet20"], default="small_cnn",
                        help="small_cnn: its convs with --channels inputs; resnet20: every prunable unit")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--scip-max-terms", type=float, default=3e6,
                        help="skip SCIP when the MIQP has more quadratic terms than this")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: results/layer_solvers.md (small_cnn), layer_solvers_<model>.md")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = RESULTS_DIR / ("layer_solvers.md" if args.model == "small_cnn" else f"layer_solvers_{args.model}.md")
    command = "python -m benchmarks.layer_solvers " + " ".join(argv if argv is not None else sys.argv[1:])

    # One BLAS / torch thread: on a shared 2-core machine, threads contending for busy cores
    # made dense factorisations up to 100x slower; SCIP and HiGHS are single-threaded anyway.
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    log = lambda message: print(message, flush=True)  # noqa: E731
    sections = []
    with threadpool_limits(limits=1):
        layers = (real_layer_problems(tuple(args.channels), log=log) if args.model == "small_cnn"
                  else network_unit_problems(args.model, log=log))
        results = []
        for layer in layers:
            prob, k = layer.problem, layer.n_channels // 2
            log(f"{layer.name}: C = {layer.n_channels}, k = {k}")
            rows = solve_layer(prob, k, args.time_limit, args.scip_max_terms, log)
            results.append((layer.name, prob, k, rows))
            sections.append(layer_table(layer.name, prob, k, rows, layer.source, layer.n_samples))
            args.output.parent.mkdir(parents=True, exist_ok=True)
            write(args.output, command, args, [summary_table(results)] + sections)
    print(args.output.read_text())
    return 0


def write(path: Path, command: str, args, sections: list[str]) -> None:
    header = [
        "# Layer solvers on real layers",
        "",
        f"Produced by `{command.strip()}` on {time.strftime('%Y-%m-%d')} "
        f"({machine()}, {platform.python_version()}, orprune {orprune.__version__}, "
        "one BLAS thread, machine shared with other jobs: times are indicative).",
        "",
        f"Each solver keeps k = C/2 channels; exact solvers and SCIP get {args.time_limit:g} s. "
        "\"vs best known\" is the error relative to the lowest error any row found; \"bound\" is "
        "the proven lower bound each solver reports (heuristics report f(all channels)); "
        "\"own gap\" = (error - bound) / error. The perspective rows' bound is certified from the "
        "relaxation's z by the Frank-Wolfe inequality, whatever the backend's accuracy.",
        "",
    ]
    path.write_text("\n".join(header) + "\n" + "\n".join(sections))


if __name__ == "__main__":
    raise SystemExit(main())
