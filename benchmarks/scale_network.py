"""Time and memory of ``orprune.prune`` on a hand-written ResNet-50, phase by phase, beside
torch-pruning's magnitude pruner on the same model in the same run.

ResNet-50 as in torchvision (bottleneck blocks 3-4-6-3, stride on the 3x3 conv, 1x1 downsample with
BatchNorm), written here because torchvision is not a dependency; random init (timing only), 64x64
inputs, 1000 classes. Run ``python -m benchmarks.scale_network`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

RESULTS = Path(__file__).resolve().parent / "results" / "scale_network.md"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = []
            for j in range(n):
                stage.append(Bottleneck(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes * 4
            blocks.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _refit_detail(refit) -> str:
    """The streamed refit's activations held (of one pass's estimate) and its node evaluations in passes."""
    if getattr(refit, "peak_bytes", None) is None:
        return ""
    return (f" (held {refit.peak_bytes / 2**20:.0f} MB of activations, one pass would hold "
            f"{refit.estimated_bytes / 2**20:.0f} MB; {refit.passes:.2f} passes)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="calibration images (default 128)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--polish-time", type=float, default=2.0, help="Pruner(polish_time=...) (default 2.0)")
    parser.add_argument("--float32-statistics", action="store_true", help="Pruner(float32_statistics=True)")
    parser.add_argument("--profile", action="store_true", help="print the cProfile top functions of fit")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the results file")
    parser.add_argument("--output", default=str(RESULTS), help="results file (default benchmarks/results/scale_network.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet50().eval()
    images = torch.randn(args.images, 3, args.size, args.size)
    calibration = [images[i : i + 32] for i in range(0, args.images, 32)]
    rows = []

    from orprune.examples.baselines import torch_pruning_baseline
    from orprune.network.costs import count_macs_params

    macs, _ = count_macs_params(model, images[:1])
    start, cpu = time.perf_counter(), time.process_time()
    pruned_tp = torch_pruning_baseline(model, images[:1], macs=0.5, importance="magnitude")
    rows.append(("torch-pruning magnitude (bisection on the ratio)", time.perf_counter() - start,
                 time.process_time() - cpu, count_macs_params(pruned_tp, images[:1])[0] / macs))
    tp_peak = _peak_mb()

    from orprune import Pruner

    pruner = Pruner(progress=True, polish_time=args.polish_time, float32_statistics=args.float32_statistics)
    profiler = cProfile.Profile() if args.profile else None
    start, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    pruner.fit(model, calibration)
    if profiler:
        profiler.disable()
    fit_time, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    result = pruner.prune(macs=0.5)
    prune_time, prune_cpu = time.perf_counter() - start, time.process_time() - cpu
    ratio = count_macs_params(result.model, images[:1])[0] / macs
    curves = sum(c.solve_time for c in pruner.curves_.values())
    solvers = sorted({c.solver for c in pruner.curves_.values()})
    rows.append((f"orprune fit (curve solves {curves:.0f} s, solvers {', '.join(solvers)})", fit_time, fit_cpu, None))
    polish = sum(p.seconds for p in result.polished)
    rows.append((f"orprune prune(macs=0.5) (allocation + {len(result.polished)} swap polishes {polish:.0f} s + "
                 "surgery + refit)", prune_time, prune_cpu, ratio))
    peak = _peak_mb()
    if profiler:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(40)
        print(stream.getvalue())
    command = "python -m benchmarks.scale_network " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# ResNet-50 at scale\n\nProduced by `{command.strip()}` on {time.strftime('%Y-%m-%d')} "
             f"({platform.machine()}, {args.threads} torch threads, 2 cores shared with other jobs). "
             f"Hand-written ResNet-50, random init, {args.images} calibration images of "
             f"{args.size}x{args.size}, {macs / 1e9:.2f} GMACs.\n",
             "| step | wall s | CPU s (all threads) | MACs kept |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {t:.1f} | {c:.1f} | {'' if r is None else f'{r:.3f}'} |" for name, t, c, r in rows]
    phases: dict[str, list[float]] = {}
    for p in result.phases:
        wall_cpu = phases.setdefault(p.name, [0.0, 0.0, 0.0])
        wall_cpu[0] += p.wall
        wall_cpu[1] += p.cpu
        wall_cpu[2] = p.peak_memory_mb or 0.0
    lines += ["", "Phases (`PruneResult.phases`, summed over repeats):", "",
              "| phase | wall s | CPU s | peak RSS at its end, MB |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {w:.1f} | {c:.1f} | {m:.0f} |" for name, (w, c, m) in phases.items()]
    lines += ["", f"Summed relative error of the chosen channels (`result.report`): "
              f"{sum(r.relative_error for r in result.report):.5f}; refit path: "
              f"{getattr(result.refit, 'path', '-')}{_refit_detail(result.refit)}; curve workers: "
              f"{getattr(pruner, 'n_jobs_used_', '-')}; target cache "
              f"{getattr(pruner.targets_, 'nbytes', 0) / 2**20:.0f} MB."]
    lines += ["", f"Peak resident memory: {tp_peak:.0f} MB after torch-pruning, {peak:.0f} MB after orprune "
              f"(process high-water mark). Load average at the end: {os.getloadavg()[0]:.1f} (2 cores)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
