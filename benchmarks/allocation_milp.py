"""Global allocation MILP on the design's setting: transport vs McCormick linearisation.

A chain of 20 3x3 convolutions with 64 channels each, all at the same 16x16 resolution, fixed 3
input channels and a 10-way classifier (so every product k_{l-1} k_l has the same weight: the
symmetric, hardest case). Layer l's error curve is E_l(k) = s_l (1 - k/64)^{p_l} with
p_l ~ U(1, 3) and s_l ~ LogNormal(0, 0.5). Budget: 50% of the unpruned MACs. For 8, 16 and 64
evenly spaced keep counts per layer and both linearisations, ``allocate`` runs with a 60 s limit
(greedy warm start, ``mip_rel_gap`` 1e-6); the transport runs at 64 options are repeated without
the warm start. The LP relaxation of each formulation is solved separately for its bound.

Run ``python benchmarks/allocation_milp.py``; writes ``benchmarks/results/allocation_milp.md``.
``--seeds``, ``--options``, ``--time-limit`` shrink the run.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import highspy
import numpy as np

from orprune.budget.allocation import (
    FORMULATIONS,
    AllocationProblem,
    CostModel,
    _expr,
    _objective,
    _presolve,
    _vals,
    allocate,
    solve_milp,
)

N_LAYERS, WIDTH, IN_CHANNELS, CLASSES, HW = 20, 64, 3, 10, 16 * 16


def network(n_options: int, seed: int) -> tuple[AllocationProblem, CostModel, CostModel]:
    """The chain instance: problem, MACs and params cost models."""
    rng = np.random.default_rng(seed)
    units = [f"conv{l}" for l in range(N_LAYERS)]
    grid = np.unique(np.round(np.linspace(WIDTH / n_options, WIDTH, n_options)).astype(int))
    errors = {u: rng.lognormal(0, 0.5) * (1 - grid / WIDTH) ** rng.uniform(1, 3) for u in units}
    macs = CostModel(
        linear={units[0]: 9 * HW * IN_CHANNELS, units[-1]: CLASSES},
        bilinear={(a, b): 9 * HW for a, b in zip(units[:-1], units[1:])},
    )
    params = CostModel(
        constant=CLASSES,
        linear={**{u: 2.0 for u in units}, units[0]: 9 * IN_CHANNELS + 2.0, units[-1]: 2.0 + CLASSES + 1},
        bilinear={(a, b): 9.0 for a, b in zip(units[:-1], units[1:])},
    )
    return AllocationProblem({u: grid for u in units}, errors), macs, params


def lp_bound(
    problem: AllocationProblem, cost: CostModel, budget: float, formulation: str
) -> tuple[float, float]:
    """Value and time of the LP relaxation after the same presolve as ``allocate``."""
    start = time.perf_counter()
    kept = _presolve(problem, [cost])
    objective = _objective(problem, kept)
    rows = [(_expr(cost, problem, kept), budget)]
    bound = solve_milp(objective, rows, _vals(problem, kept), formulation, 600.0, 0.0, None, relax=True).bound
    return bound, time.perf_counter() - start


def run(n: int, seed: int, formulation: str, warm_start: bool, time_limit: float) -> dict:
    problem, macs, params = network(n, seed)
    budget = 0.5 * macs.evaluate({u: WIDTH for u in problem.units})
    lp, t_lp = lp_bound(problem, macs, budget, formulation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the time-limit warning: the table says it
        a = allocate(problem, {"macs": macs, "params": params}, {"macs": budget},
                     time_limit=time_limit, formulation=formulation, warm_start=warm_start)
    return {"options": n, "seed": seed, "formulation": formulation, "warm": warm_start,
            "time": a.solve_time, "status": a.status, "gap": a.gap, "objective": a.objective,
            "bound": a.bound, "lp": lp, "root_gap": (a.objective - lp) / a.objective, "t_lp": t_lp,
            "nodes": a.info.get("nodes"), "size": f"{a.info.get('columns')} x {a.info.get('rows')}",
            "macs": a.costs["macs"] / (2 * budget)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--options", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "allocation_milp.md")
    args = parser.parse_args()
    plan = [(n, s, f, True) for n in args.options for s in args.seeds for f in FORMULATIONS]
    plan += [(n, s, "transport", False) for n in args.options if n == max(args.options) for s in args.seeds]
    rows = []
    for n, seed, formulation, warm in plan:
        r = run(n, seed, formulation, warm, args.time_limit)
        rows.append(r)
        fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
        print(" ".join(fields), flush=True)
    write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    lines = [
        "# Global allocation MILP: transport vs McCormick linearisation",
        "",
        f"Chain of {N_LAYERS} 3x3 convs x {WIDTH} channels (all 16x16), 50% MACs budget, "
        f"time limit {args.time_limit:g} s, `mip_rel_gap` 1e-6, HiGHS {highspy.Highs().version()}, "
        f"Python {platform.python_version()}. Wall times include model building, presolve and the "
        "greedy start; the machine is shared (2 cores), so compare within a row group. "
        "Root gap = (objective - LP bound) / objective. Generated by `python benchmarks/allocation_milp.py`.",
        "",
        "| options | seed | formulation | warm start | time (s) | status | gap | objective | bound "
        "| LP bound | root gap | LP time (s) | nodes | cols x rows | MACs kept |",
        "|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['options']} | {r['seed']} | {r['formulation']} | {'yes' if r['warm'] else 'no'} | "
            f"{r['time']:.2f} | {r['status']} | {r['gap']:.1e} | {r['objective']:.6f} | {r['bound']:.6f} | "
            f"{r['lp']:.6f} | {r['root_gap']:.1e} | {r['t_lp']:.2f} | {r['nodes']} | {r['size']} | "
            f"{r['macs']:.4f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
