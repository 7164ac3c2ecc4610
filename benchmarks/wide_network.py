"""A VGG-11-BN-style network whose classifier reads a flattened 7 x 7 map: the wide path against the exact one.

The same network, calibration and budget, pruned by :class:`orprune.Pruner` twice: with ``max_features`` below the
classifier's ``C * 49`` columns (the wide mechanism: selection on ``max_features // C`` compressed columns per
channel, the exact refit from stored rows, ``formulations/wide_consumers.md``) and with ``max_features`` above it
(the exact problem, the only choice a VGG-11 of full width does not have: its Gram matrix would be 5 GB). Random
initialisation, BatchNorm statistics from the calibration images, random inputs. Reports the keep count of the
unit feeding the classifier, the classifier's exact relative error at that count (and the compressed curve's upper
bound), the pruned network's relative output error on held-out inputs, and CPU / wall time.

Run from the repository root::

    python -m benchmarks.wide_network
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, machine  # noqa: E402
from orprune import Pruner  # noqa: E402
from orprune.layer.wide import WideProblem  # noqa: E402


def vgg11_bn(width: int, hidden: int) -> nn.Module:
    """VGG-11-BN's layout (8 convs, 5 pools, 7 x 7 adaptive pool, 3 Linear layers) at 1/``width`` of its channels."""
    layers: list[nn.Module] = []
    previous = 3
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(previous, int(v) // width, 3, padding=1), nn.BatchNorm2d(int(v) // width), nn.ReLU()]
        previous = int(v) // width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                         nn.Linear(previous * 49, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def run(model: nn.Module, batches: list[torch.Tensor], test: torch.Tensor, max_features: int,
        macs: float) -> dict:
    t, wall = time.process_time(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(max_features=max_features, progress=False, polish_time=None).fit(model, batches)
        fit = (time.process_time() - t, time.perf_counter() - wall)
        result = pruner.prune(macs=macs)
    total = (time.process_time() - t, time.perf_counter() - wall)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    (consumer,) = pruner.graph_[last].consumers
    k = int(result.plan.keep[last].size) if last in result.plan.keep else pruner.graph_[last].n_channels
    problem = pruner.problems_[consumer.name]
    mask = np.zeros(pruner.graph_[last].n_channels, dtype=bool)
    mask[result.plan.keep.get(last, np.arange(mask.size))] = True
    exact = problem.exact_objective(mask) if isinstance(problem, WideProblem) else problem.objective(mask)
    with torch.no_grad():
        before, after = model(test), result.model(test)
    return {"wide": consumer.wide, "s": consumer.sketch, "k": k, "C": pruner.graph_[last].n_channels,
            "exact": exact / problem.yy, "curve": problem.objective(mask) / problem.yy,
            "output": float(((after - before) ** 2).sum() / ((before - before.mean(0)) ** 2).sum()),
            "macs": result.macs_after / result.macs_before, "fit": fit, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=8, help="channels are VGG-11's over this")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="calibration images (32 x 32)")
    parser.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.3], help="MACs budgets")
    parser.add_argument("--wide-features", type=int, default=1024, help="max_features of the wide run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass
    torch.manual_seed(0)
    model = vgg11_bn(args.width, args.hidden)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(128, 3, 32, 32, generator=gen) for _ in range(args.images // 128)]
    test = torch.randn(512, 3, 32, 32, generator=gen)
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()
    columns = (512 // args.width) * 49
    lines = [f"`python -m benchmarks.wide_network {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
             f"Machine: {machine()}, 1 thread. VGG-11-BN layout at 1/{args.width} width, classifier input "
             f"{512 // args.width} x 7 x 7 = {columns} columns, {args.images} calibration images (one classifier "
             f"row each).", "",
             "| run | MACs budget | max_features | s | kept / C (last conv) | classifier exact rel. error | curve (upper bound) | "
             "output rel. error (held out) | MACs kept | fit CPU / wall s | fit + prune CPU / wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for macs in args.macs:
        for name, limit in (("wide", args.wide_features), ("exact", max(4608, columns))):
            r = run(copy.deepcopy(model), batches, test, limit, macs)
            lines.append(f"| {name} | {macs} | {limit} | {r['s']} | {r['k']} / {r['C']} | {r['exact']:.4g} | "
                         f"{r['curve']:.4g} | {r['output']:.4g} | {r['macs']:.3f} | {r['fit'][0]:.0f} / "
                         f"{r['fit'][1]:.0f} | {r['total'][0]:.0f} / {r['total'][1]:.0f} |")
            print(lines[-1], flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "wide_network.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
