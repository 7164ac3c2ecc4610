"""Time and peak memory of one layer's whole error curve against its width (the network part is
``benchmarks/scale_network.py``).

Layer part: random problems from sufficient statistics (Gram = F F^T + diagonal, F of rank
min(Cg, 256), 64 outputs, ridge 1e-4 x mean diagonal), the whole curve (every keep count) by
``greedy_path`` (today's default beyond 16 channels) and by the blocked forward / backward paths of
``orprune.layer.solvers.paths``; ``best_paths`` (what ``solver="path"`` runs) is both, so its time is
their sum and its error their minimum. Each case runs in its own subprocess so its peak resident
memory (``ru_maxrss``) is its own.

Run ``python -m benchmarks.scale`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "scale.md"
LAYER_CASES = [(512, 1), (1024, 1), (2048, 1), (4096, 1), (64, 9), (128, 9), (256, 9), (512, 9), (11008, 1)]
METHODS = ("greedy", "forward", "backward")


def layer_problem(n_channels: int, group_size: int, seed: int = 0):
    """A random layer problem of ``n_channels`` channels, built from statistics only."""
    from orprune.layer.problem import LayerProblem

    rng = np.random.default_rng(seed)
    n = n_channels * group_size
    rank = min(n, 256)
    F = rng.standard_normal((n, rank)) / np.sqrt(rank) * 3.0  # strongly correlated channels
    gram = F @ F.T
    gram[np.diag_indices(n)] += 0.05 + 0.5 * rng.random(n)
    # every channel matters, with heavy-tailed importance, so the choice matters at every keep count
    W = rng.standard_normal((n, 64)) * rng.pareto(2.0, size=(n, 1)) + rng.standard_normal((n, 1)) * rng.standard_normal((1, 64)) * 3
    cross = gram @ W
    yy = 1.25 * float(np.sum(W * cross))  # a fifth of ||Y||^2 is noise outside the span of X
    ridge = 1e-4 * float(np.mean(np.diag(gram)))
    gram[np.diag_indices(n)] += ridge
    # built valid by construction: skip the O((Cg)^3) validation of the public constructor
    return LayerProblem._trusted(gram, cross, yy, group_size=group_size)


def run_layer_case(n_channels: int, group_size: int, method: str) -> dict:
    """Time, CPU time, peak memory and curve of one method on one problem (run in a subprocess)."""
    from orprune.layer.solvers.greedy import greedy_path
    from orprune.layer.solvers.paths import nested_path

    prob = layer_problem(n_channels, group_size)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = time.perf_counter(), time.process_time()
    if method == "greedy":
        errors = greedy_path(prob, n_channels)[1]
    else:
        errors = nested_path(prob, method)[1]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"C": n_channels, "g": group_size, "method": method, "wall": wall, "cpu": cpu,
            "peak_mb": peak / 1024, "problem_mb": base / 1024, "errors": (errors / prob.yy).tolist()}


def _subprocess(args: list[str], timeout: float) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, "-m", "benchmarks.scale", *args], capture_output=True, text=True,
                             timeout=timeout, env=env, check=True)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(result: dict, greedy: dict | None) -> str:
    C, errors = result["C"], np.asarray(result["errors"])
    ratio = "" if greedy is None else f"{np.mean(errors[1:] / np.maximum(greedy['errors'][1:], 1e-300)):.3f}"
    return (f"| {C} | {result['g']} | {result['method']} | {result['wall']:.1f} | {result['cpu']:.1f} | "
            f"{result['peak_mb']:.0f} | {errors[C // 2]:.4f} | {ratio} |")


def layer_table(cases: list[tuple[int, int]], greedy_max_features: int, timeout: float) -> list[str]:
    rows = ["| C | g | method | wall s | CPU s | peak RSS MB | rel. error at C/2 | mean error / greedy's |",
            "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for C, g in cases:
        results: dict[str, dict] = {}
        for method in METHODS:
            if method == "greedy" and C * g > greedy_max_features and g == 1:
                continue
            result = _subprocess(["--case", str(C), str(g), method], timeout)
            if result is None:
                rows.append(f"| {C} | {g} | {method} | > {timeout:.0f} | | | | |")
                continue
            results[method] = result
            rows.append(_row(result, results.get("greedy")))
            print(rows[-1], flush=True)
        if "forward" in results and "backward" in results:
            f, b = results["forward"], results["backward"]
            best = {"C": C, "g": g, "method": "**best** (both)", "wall": f["wall"] + b["wall"],
                    "cpu": f["cpu"] + b["cpu"], "peak_mb": max(f["peak_mb"], b["peak_mb"]),
                    "errors": np.minimum(f["errors"], b["errors"]).tolist()}
            rows.append(_row(best, results.get("greedy")))
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-channels", type=int, default=11008, help="largest layer width (default 11008)")
    parser.add_argument("--greedy-max-features", type=int, default=2048,
                        help="run greedy_path on g = 1 layers only up to this many columns (default 2048; "
                             "always on g > 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case (default 1800)")
    parser.add_argument("--case", nargs=3, metavar=("C", "G", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_layer_case(int(args.case[0]), int(args.case[1]), args.case[2])))
        return
    command = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# orprune at scale\n\nProduced by `{command.strip()}` on {time.strftime('%Y-%m-%d')} "
             f"({platform.machine()}, one BLAS thread per case, 2 cores shared with other jobs: wall times "
             "are inflated by contention, CPU times less so).\n"]
    cases = [(C, g) for C, g in LAYER_CASES if C <= args.max_channels]
    lines += ["## One layer, whole error curve (every keep count)\n",
              "Random problems from statistics (`layer_problem`). `greedy` = `greedy_path` (the default "
              "beyond 16 channels until now), `forward` / `backward` = `nested_path`, `best` = `best_paths` "
              "(both, the better mask per count; what `solver=\"path\"` and `auto` on wide units run; its "
              "time is the sum of the two). Relative error = error / ||Y||^2; last column: mean over k >= 1 "
              "of error(k) / greedy's error(k) (below 1 = better than greedy).\n"]
    lines += layer_table(cases, args.greedy_max_features, args.timeout) + [""]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
