"""torchvision's ShuffleNetV2 stages through orprune: which stages are prunable, with how many keep counts, and the time.

``orprune.examples.coverage_zoo.ShuffleNetV2`` with the stage widths and depths of torchvision's configurations
(3 stages of 3 / 7 / 3 stride-1 blocks; the zoo's stem of 8 channels and 1x1 head of 24 instead of torchvision's
24 and 1024), random initialisation, BatchNorm statistics randomised. Per configuration: the time of
``find_groups``, the units and groups left alone, and per stage the chained units a chunk's balance ties
(``formulations/split_and_shuffle.md`` section 4): their widths and the number of keep counts the balance allows
(1: the stage tensor keeps its width). Then ``Pruner(solver=...).fit(...).prune(macs=...)``: MACs reached,
seconds, ``max |pruned - masked| / max |masked|`` on a held-out batch. torch-pruning 1.6 cannot build the
dependency graph of any of these models (two stride-1 blocks in a row).

Run ``python -m benchmarks.shufflenet_stages`` (``--help`` for the settings); writes
``benchmarks/results/shufflenet_stages.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from datetime import date

import torch

import orprune
from benchmarks.common import RESULTS_DIR, machine
from orprune.examples.coverage_zoo import ShuffleNetV2, randomize_batchnorm
from orprune.network.graph import find_groups
from orprune.network.surgery import masked_copy

#: torchvision's stage widths (``stages_out_channels[1:4]``); every configuration has 3 / 7 / 3 stride-1 blocks.
CONFIGS: dict[str, tuple[int, ...]] = {
    "x0.5": (48, 96, 192), "x1.0": (116, 232, 464), "x1.5": (176, 352, 704), "x2.0": (244, 488, 976),
}
DEPTHS = (3, 7, 3)


def run_config(name: str, widths: tuple[int, ...], depths: tuple[int, ...], size: int, images: int, macs: float,
               solver: str) -> list[str]:
    """The report lines of one configuration."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ShuffleNetV2(widths, n_classes=10, depths=depths)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(min(images, 32), 3, size, size, generator=gen) for _ in range(max(1, images // 32))]
    held_out = torch.randn(8, 3, size, size, generator=gen)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(model, batches[0][:1])
    traced = time.perf_counter() - start
    left = ", ".join(f"`{e.root}` ({e.reason})" for e in graph.excluded)
    lines = [f"### {name}: stage widths {widths}, stride-1 blocks {depths}", "",
             f"`find_groups` {traced:.1f} s: {len(graph.units)} units / {len(graph.excluded)} left alone: {left}.", "",
             "| stage | chained units (channels) | keep counts allowed |", "|---|---|---:|"]
    first_block = [sum(d + 1 for d in depths[:i]) for i in range(len(depths))]
    for chain in sorted(graph.chains, key=lambda c: int(next(iter(c)).split(".")[1])):
        block = int(next(iter(chain)).split(".")[1])
        stage = max(i for i, b in enumerate(first_block) if b <= block) + 1
        steps = max(len(options) for options in chain.values())
        widths_of = ", ".join(str(graph[u].n_channels) for u in sorted(chain, key=lambda u: -graph[u].n_channels))
        lines.append(f"| {stage} | {widths_of} | {steps} |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = time.perf_counter()
        pruner = orprune.Pruner(solver=solver, progress=False).fit(model, batches)
        fitted = time.perf_counter() - start
        start = time.perf_counter()
        result = pruner.prune(macs=macs)
        pruned = time.perf_counter() - start
    with torch.no_grad():
        reference = masked_copy(model, pruner.graph_, result.plan)(held_out)
        diff = float((result.model(held_out) - reference).abs().max() / reference.abs().max())
    stage_units = sum(len(c) for c in graph.chains)
    narrowed = sum(1 for c in graph.chains for u in c if result.plan.keep.get(u) is not None
                   and result.plan.keep[u].size < graph[u].n_channels)
    lines += ["", f"`Pruner(solver={solver!r})` on {len(batches) * batches[0].shape[0]} images {size}x{size}: fit "
              f"{fitted:.1f} s, `prune(macs={macs})` {pruned:.1f} s, MACs {result.macs_after / result.macs_before:.3f}"
              f" of {result.macs_before:,.0f}, pruned vs masked {diff:.1e}; {narrowed} of the {stage_units} chained "
              "units narrowed.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="x0.5,x1.0", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--size", type=int, default=64, help="input size (pixels)")
    parser.add_argument("--images", type=int, default=64, help="calibration images (batches of 32)")
    parser.add_argument("--macs", type=float, default=0.5, help="MACs fraction to keep")
    parser.add_argument("--solver", default="greedy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(RESULTS_DIR / "shufflenet_stages.md"))
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    if not 0 < args.macs <= 1:
        parser.error(f"--macs must be in (0, 1], got {args.macs}")
    torch.set_num_threads(args.threads)
    lines = [f"Command: `python -m benchmarks.shufflenet_stages {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"{date.today()}, {machine()}, {args.threads} thread(s); random initialisation. torchvision's stage "
             "widths and depths, the zoo's stem (8) and head (24).", ""]
    for name in names:
        lines += run_config(name, CONFIGS[name], DEPTHS, args.size, args.images, args.macs, args.solver)
        print("\n".join(lines[-12:]), flush=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
