"""How much of the gap each node bound closes, at the root and at depth, on the ResNet-20 units (issue 26).

For the 16-channel units (g = 9, k = C/2) every subset is evaluated, so the optimum of any node is
known. Random nodes at depths 0, 2, ..., 10 (``--nodes`` per depth: random kept / dropped channels) are
bounded by (1) the perspective relaxation with the node's precision split (what ``bnb`` computes,
converged), (2) the removal-view Shor cut computed once at the root (``removal_shor`` + ``removal_cut``,
minimised exactly over the node's completions) and (3) optionally the removal-view Shor SDP solved at the
node itself (``--node-sdp`` nodes per depth; seconds to a minute each). Reported: the mean ratio bound /
node optimum and how many nodes that cannot contain a better solution than the optimum each bound closes.
``--root-units`` also solves the root SDP of wider units (minutes; 32 channels: a 320 x 320 PSD block).
Writes ``benchmarks/results/bnb_depth_bounds.md``.

Run from the repository root::

    python -m benchmarks.bnb_depth_bounds --epochs 1
"""

from __future__ import annotations

import argparse
import itertools
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
from orprune.layer.solvers._perspective import perspective_relaxation, perspective_split  # noqa: E402
from orprune.layer.solvers._sdp_bounds import removal_cut, removal_shor  # noqa: E402

DEPTHS = (0, 2, 4, 6, 8, 10)


def _columns(channels, g):
    channels = np.asarray(channels, dtype=int)
    return (channels[:, None] * g + np.arange(g)).ravel()


def _normalised(prob):
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    scale = float(np.mean(np.diag(H)))
    return H / scale, prob.cross / np.sqrt(scale * prob.yy)


def _node(H, B, g, kept, free):
    """The node's kept view ``(P, R, e0)`` (Schur complement of the kept channels)."""
    cu, ck = _columns(free, g), _columns(kept, g)
    P, R, e0 = H[np.ix_(cu, cu)], B[cu], 1.0
    if len(kept):
        solve = np.linalg.solve(H[np.ix_(ck, ck)], np.hstack([H[np.ix_(ck, cu)], B[ck]]))
        P = P - H[np.ix_(cu, ck)] @ solve[:, :cu.size]
        R = R - H[np.ix_(cu, ck)] @ solve[:, cu.size:]
        e0 = 1.0 - float(np.sum(B[ck] * solve[:, cu.size:]))
    return 0.5 * (P + P.T), R, e0


def depth_table(prob, nodes: int, node_sdp: int, seed: int = 0):
    C, g = prob.n_channels, prob.group_size
    k = C // 2
    H, B = _normalised(prob)
    subsets = list(itertools.combinations(range(C), k))
    masks = np.zeros((len(subsets), C), dtype=bool)
    for i, S in enumerate(subsets):
        masks[i, list(S)] = True
    values = np.array([prob.objective(mask) for mask in masks]) / prob.yy
    optimum = float(values.min())
    cpu = time.process_time()
    root, V = removal_shor(H, B, 1.0, g, k)
    root_cpu = time.process_time() - cpu
    fA, a, Q = removal_cut(H, B, g, V)
    removed = (~masks).astype(float)
    cut = 1.0 + fA + removed @ a - np.einsum("ic,cd,id->i", removed, Q, removed)
    assert np.all(cut <= values + 1e-9), "the removal cut must hold on every subset"
    rng = np.random.default_rng(seed)
    rows = []
    for depth in DEPTHS:
        ratios, closed, node_ratios, sdp_cpu = [], np.zeros(4, dtype=int), [], 0.0
        for q in range(1 if depth == 0 else nodes):
            chosen = rng.permutation(C)[:depth]
            n_kept = int(rng.integers(max(0, depth - (C - k)), min(depth, k) + 1))
            kept, dropped = chosen[:n_kept], chosen[n_kept:]
            inside = np.all(masks[:, kept], axis=1) & ~np.any(masks[:, dropped], axis=1)
            node_opt = float(values[inside].min())
            free = np.setdiff1d(np.arange(C), chosen)
            P, R, e0 = _node(H, B, g, kept, free)
            m = k - n_kept
            relax = perspective_relaxation(P, R, e0, perspective_split(P, g, "precision"), m, max_iter=2000,
                                           rel_tol=1e-7).bound if 0 < m < free.size else node_opt
            reused = float(cut[inside].min())
            ratios.append((relax / node_opt, reused / node_opt))
            if node_opt >= optimum * (1 + 1e-9):  # a node the search must close
                closed += np.array([1, relax >= optimum, reused >= optimum, max(relax, reused) >= optimum])
            if q < node_sdp and 0 < m < free.size:
                cpu = time.process_time()
                node_ratios.append(removal_shor(P, R, e0, g, m)[0].value / node_opt)
                sdp_cpu += time.process_time() - cpu
        ratios = np.array(ratios)
        rows.append((depth, len(ratios), ratios[:, 0].mean(), ratios[:, 1].mean(), closed,
                     np.mean(node_ratios) if node_ratios else None, len(node_ratios), sdp_cpu))
    return optimum, root.value, root_cpu, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the (cached) ResNet-20")
    parser.add_argument("--nodes", type=int, default=12, help="random nodes per depth")
    parser.add_argument("--node-sdp", type=int, default=0, help="nodes per depth whose own SDP is solved")
    parser.add_argument("--units", nargs="*", default=None,
                        help="16-channel units to tabulate (default: every 16-channel, g = 9 unit)")
    parser.add_argument("--root-units", nargs="*", default=[], help="wider units whose root SDP is solved")
    parser.add_argument("--output", default=str(RESULTS_DIR / "bnb_depth_bounds.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    layers = network_unit_problems("resnet20", epochs=args.epochs, log=None)
    command = "python -m benchmarks.bnb_depth_bounds " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Node bounds at the root and at depth (issue 26)", "",
             f"Produced by `{command.strip()}` on {time.strftime('%Y-%m-%d')} ({machine()}, "
             f"{platform.python_version()}, orprune {orprune.__version__}, one BLAS / torch thread; CPU times).",
             "", "Columns: mean of bound / node optimum over random nodes; \"closed\": nodes whose optimum is "
             "above the unit's optimum (the search must close them) that the bound closes. \"precision\": "
             "the perspective relaxation with the node's precision split (bnb's node bound, converged); "
             "\"root cut\": the removal-view Shor SDP solved once at the root, its dual cut minimised exactly "
             "over the node's completions; \"node SDP\": the removal-view Shor SDP solved at the node.", ""]
    for layer in layers:
        prob = layer.problem
        if prob.n_channels != 16 or prob.group_size != 9 or (args.units is not None and layer.name not in args.units):
            continue
        print(layer.name, flush=True)
        optimum, root_value, root_cpu, rows = depth_table(prob, args.nodes, args.node_sdp)
        lines += [f"## {layer.name} (C = 16, g = 9, k = 8)", "",
                  f"Optimum {optimum:.6g}; removal-view Shor at the root {root_value:.6g} "
                  f"({root_value / optimum:.1%} of the optimum, {root_cpu:.0f} s CPU).", "",
                  "| depth | nodes | precision / node opt | root cut / node opt | node SDP / node opt | "
                  "closed: precision | root cut | either |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for depth, count, prec, reused, closed, node_sdp, n_sdp, sdp_cpu in rows:
            sdp = "-" if node_sdp is None else f"{node_sdp:.3f} ({n_sdp} nodes, {sdp_cpu / n_sdp:.0f} s CPU each)"
            lines.append(f"| {depth} | {count} | {prec:.3f} | {reused:.3f} | {sdp} | {closed[1]}/{closed[0]} | "
                         f"{closed[2]}/{closed[0]} | {closed[3]}/{closed[0]} |")
            print(lines[-1], flush=True)
        lines.append("")
        Path(args.output).write_text("\n".join(lines) + "\n")  # after every unit: the runs are long
    for name in args.root_units:
        prob = next(layer.problem for layer in layers if layer.name == name)
        H, B = _normalised(prob)
        k = prob.n_channels // 2
        best = orprune.select(prob, k, solver="swap").objective / prob.yy
        precision = perspective_relaxation(H, B, 1.0, perspective_split(H, prob.group_size, "precision"), k,
                                           max_iter=2000, rel_tol=1e-7).bound
        cpu = time.process_time()
        value = removal_shor(H, B, 1.0, prob.group_size, k, eps=1e-5)[0].value
        lines.append(f"Root of {name} (C = {prob.n_channels}): best known (swap) {best:.6g}; precision relaxation "
                     f"{precision / best:.1%}; removal-view Shor {value / best:.1%} ({time.process_time() - cpu:.0f} s "
                     "CPU).")
        print(lines[-1], flush=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
