"""Soak test: many random small networks pruned one after another in one process; failures must be 0.

Each network is drawn from a seed: 1-3 input channels, a stem conv, 1-4 stages of plain or residual
conv blocks (random widths 2-12, 1x1 or 3x3 kernels, BatchNorm or bias, optional max-pooling), global
pooling and a Linear classifier (sometimes with a hidden Linear layer). It is pruned by
``orprune.prune`` at a random MACs and/or params budget with a random solver, allocation and error
measure. A run is a failure when it raises anything but the documented "budget cannot be met"
``ValueError``, when the pruned model breaks its budget, or when its outputs differ from the masked
original's (the same channels zeroed, the same refitted weights: ``masked_copy``). The process's
peak memory is reported too (a leak would grow it with the count).

Run from the repository root::

    python -m benchmarks.soak --networks 200

Writes ``benchmarks/results/soak.md``.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orprune  # noqa: E402
from benchmarks.common import RESULTS_DIR, machine  # noqa: E402
from orprune.network.costs import count_macs_params  # noqa: E402
from orprune.network.surgery import masked_copy  # noqa: E402


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus a shortcut when ``residual``."""

    def __init__(self, channels: int, hidden: int, kernel: int, residual: bool, bn: bool) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(channels, hidden, kernel, padding=pad, bias=not bn)
        self.bn1 = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(hidden, channels, kernel, padding=pad, bias=not bn)
        self.bn2 = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + x if self.residual else out)


def random_network(rng: random.Random) -> tuple[nn.Module, int]:
    """A random small CNN and its number of input channels."""
    in_channels = rng.randint(1, 3)
    bn = rng.random() < 0.7
    width = rng.randint(2, 12)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=not bn)]
    layers += [nn.BatchNorm2d(width)] if bn else []
    layers.append(nn.ReLU())
    for stage in range(rng.randint(1, 4)):
        if stage and rng.random() < 0.5:
            new = rng.randint(2, 12)  # a width change: a plain conv between stages
            layers += [nn.Conv2d(width, new, 1, bias=not bn)] + ([nn.BatchNorm2d(new)] if bn else []) + [nn.ReLU()]
            width = new
        layers.append(Block(width, rng.randint(2, 12), rng.choice([1, 3]), rng.random() < 0.5, bn))
        if rng.random() < 0.3:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if rng.random() < 0.4:
        hidden = rng.randint(2, 16)
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, rng.randint(2, 10))]
    else:
        layers.append(nn.Linear(width, rng.randint(2, 10)))
    model = nn.Sequential(*layers)
    with torch.no_grad():  # BatchNorm statistics of the random inputs: realistic scales
        model.train()(torch.randn(64, in_channels, 8, 8))
    return model.eval(), in_channels


def one_run(seed: int) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, in_channels = random_network(rng)
    calibration = [torch.randn(16, in_channels, 8, 8) for _ in range(2)]
    budget = {"macs": round(rng.uniform(0.3, 0.95), 2)}
    if rng.random() < 0.3:
        budget["params"] = round(rng.uniform(0.3, 0.95), 2)
    options = dict(solver=rng.choice(["auto", "greedy", "swap"]), errors=rng.choice(["layer", "layer", "output"]),
                   round_to=rng.choice([1, 1, 2]), sequential=rng.random() < 0.8, positions_per_image=8,
                   time_limit=0.5, progress=False, seed=seed)
    row = {"seed": seed, **budget, **{k: options[k] for k in ("solver", "errors", "round_to", "sequential")}}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # groups left unpruned, time limits: not failures
            pruner = orprune.Pruner(**options).fit(model, calibration)
            result = pruner.prune(**budget)
    except ValueError as exc:
        row.update(outcome="infeasible" if "cannot be met" in str(exc) else "failure", detail=str(exc)[:200])
        row["seconds"] = time.perf_counter() - start
        return row
    except Exception as exc:  # anything else is a bug
        row.update(outcome="failure", detail=f"{type(exc).__name__}: {exc}"[:200] + "\n" + traceback.format_exc())
        row["seconds"] = time.perf_counter() - start
        return row
    x = torch.randn(8, in_channels, 8, 8)
    macs, params = count_macs_params(result.model, x[:1])
    problems = []
    for name, achieved, before in (("macs", macs, result.macs_before), ("params", params, result.params_before)):
        if name in budget and achieved > budget[name] * before * (1 + 1e-9):
            problems.append(f"{name} {achieved} above the budget {budget[name]} x {before}")
    with torch.no_grad():
        pruned_out = result.model(x)
        masked_out = masked_copy(model, pruner.graph_, result.plan).eval()(x)
    scale = float(masked_out.abs().max()) or 1.0
    if pruned_out.shape != masked_out.shape or not torch.allclose(pruned_out, masked_out, rtol=1e-4,
                                                                   atol=1e-4 * scale):
        problems.append("pruned outputs differ from the masked model's")
    row.update(outcome="failure" if problems else "ok", detail="; ".join(problems), units=len(pruner.graph_.units),
               macs_kept=macs / result.macs_before, seconds=time.perf_counter() - start)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--networks", type=int, default=200, help="random networks to prune")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "soak.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, start = [], time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.networks):
        row = one_run(seed)
        rows.append(row)
        if row["outcome"] == "failure":
            print(f"seed {seed}: FAILURE {row['detail']}", flush=True)
    total = time.perf_counter() - start
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("ok", "infeasible", "failure")}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ok = [r for r in rows if r["outcome"] == "ok"]
    lines = [
        f"# Soak: {args.networks} random small networks pruned in one process",
        "",
        f"Produced by `python -m benchmarks.soak --networks {args.networks} --first-seed {args.first_seed}` on "
        f"{time.strftime('%Y-%m-%d')} ({machine()}, one torch thread, machine shared with other jobs: times are "
        f"indicative). Total {total:.0f} s, peak memory (max RSS) {peak_mb:.0f} MB.",
        "",
        "| outcome | networks |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in counts.items()),
        "",
        "ok: the pruned model meets its budgets and its outputs equal the masked original's (rtol 1e-4); "
        "infeasible: `ValueError` \"the budget cannot be met\" (a budget below what the prunable groups allow); "
        "failure: anything else.",
        "",
        f"Units per network: {min(r['units'] for r in ok)}-{max(r['units'] for r in ok)}; MACs kept "
        f"{min(r['macs_kept'] for r in ok):.2f}-{max(r['macs_kept'] for r in ok):.2f}; seconds per network "
        f"{min(r['seconds'] for r in rows):.2f}-{max(r['seconds'] for r in rows):.2f}." if ok else "",
    ]
    failures = [r for r in rows if r["outcome"] == "failure"]
    if failures:
        lines += ["", "## Failures", ""] + [f"- seed {r['seed']} ({r['solver']}, {r['errors']}): "
                                            f"{r['detail'].splitlines()[0]}" for r in failures]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
