"""Which channels does UCP's excitation score keep? Their reconstruction error against random and magnitude.

On the trained network of ``benchmarks.ucp`` (same settings, same cache), the allocation MILP gives the keep
counts at each MACs fraction (free widths); at those counts each unit keeps the channels of

- the error curves (orprune's selection, what the MILP's objective sums),
- the highest mean excitation (``orprune.ucp.se_importance``, joint as in the paper, and frozen),
- the largest L1 norm of the root's filters (magnitude),
- uniformly random scores (``--draws`` draws: mean, min, max),

and the table gives the summed least-squares reconstruction error of each unit's consumers (relative to
their outputs) after the refit on those channels. No training beyond the excitation blocks: it takes minutes.

Run ``python -m benchmarks.ucp_channels`` (``--help``); writes ``benchmarks/results/ucp_channels.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from datetime import date

import numpy as np
import torch

import orprune
from benchmarks.common import RESULTS_DIR, machine
from benchmarks.ucp import Clock, base_model, data
from orprune._pipeline_steps import top_channels
from orprune.budget.allocation import AllocationProblem, allocate
from orprune.ucp import se_importance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--depth", type=int, default=14)
    parser.add_argument("--base-epochs", type=float, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--se-epochs", type=float, default=3)
    parser.add_argument("--se-lr", type=float, default=0.05)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--macs", default="0.5,0.3,0.15")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--output", default=str(RESULTS_DIR / "ucp_channels.md"))
    args = parser.parse_args(argv)
    args.flip = False
    command = "python -m benchmarks.ucp_channels " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    x, y, _, _, dataset = data(args.dataset, args.train_images)
    model = base_model(args, x, y, dataset, Clock())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(progress=False).fit(model, list(x[: args.calibration].split(256)))
    scores = {}
    for mode in ("joint", "frozen"):
        scores[f"SE ({mode})"] = se_importance(model, x, y, graph=pruner.graph_, epochs=args.se_epochs,
                                               lr=args.se_lr, batch_size=args.batch_size, freeze=mode == "frozen",
                                               flip=False, threads=1).scores
    magnitude = {}
    for unit in pruner.graph_.units:
        w = pruner.model_.get_submodule(unit.root).weight.detach().double().numpy()
        magnitude[unit.name] = np.abs(w.reshape(w.shape[0], -1)).sum(1).reshape(unit.tie, -1).mean(0)
    scores["L1 magnitude of the root's filters"] = magnitude
    problem = AllocationProblem({u: c.keep_counts for u, c in pruner.curves_.items()},
                                {u: c.errors for u, c in pruner.curves_.items()})
    full = pruner.costs_.evaluate()["macs"]
    rng = np.random.default_rng(0)
    rows = []
    for fraction in [float(v) for v in args.macs.split(",")]:
        keep = allocate(problem, {"macs": pruner.costs_.macs}, {"macs": fraction * full}).keep

        def error(chosen: dict) -> float:
            return sum(pruner.unit_problems_[u].objective(top_channels(chosen[u], k)) for u, k in keep.items())

        curves = sum(pruner.unit_problems_[u].objective(pruner.curves_[u].mask_for(k)) for u, k in keep.items())
        draws = [error({u.name: rng.random(u.n_channels) for u in pruner.graph_.units}) for _ in range(args.draws)]
        rows.append((fraction, curves, {name: error(s) for name, s in scores.items()}, draws))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    names = list(scores)
    lines = [f"# Channels chosen by UCP's excitation score: ResNet-{args.depth} on {dataset}", "",
             f"Produced by `{command}` on {date.today().isoformat()} ({machine()}, 1 torch thread, {wall:.0f} s "
             f"wall, {cpu:.0f} s CPU).", "",
             "Summed relative reconstruction error after the least-squares refit, at the keep counts of the "
             "allocation MILP (free widths), for the channels of each choice. Lower is better; the error curves' "
             f"channels are what orprune keeps. Random: {args.draws} draws of uniform scores. SE: "
             f"{args.se_epochs:g} epochs at max lr {args.se_lr:g}, as in `benchmarks/ucp.py`.", "",
             "| MACs budget | error curves | " + " | ".join(names) + " | random: mean (min - max) |",
             "|---:|---:|" + "---:|" * len(names) + "---|"]
    for fraction, curves, errors, draws in rows:
        lines.append(f"| {fraction:.2f} | {curves:.4f} | " + " | ".join(f"{errors[n]:.4f}" for n in names)
                     + f" | {np.mean(draws):.4f} ({np.min(draws):.4f} - {np.max(draws):.4f}) |")
    text = "\n".join(lines) + "\n"
    with open(args.output, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
