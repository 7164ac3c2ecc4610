"""Wide consumers: channel selection on compressed columns against the exact problem, and the cost at VGG size.

Part 1 (quality, where the exact problem fits): a classifier on the *flattened* last feature map of the trained
ResNet-20 (Fashion-MNIST, 64 channels x 7 x 7 = 3136 columns, the shape of VGG's 512 x 7 x 7 classifier input):
targets ``Y = X W`` of a linear map ``W`` (``random``: Gaussian, 256 outputs; ``trained``: the ridge least-squares
classifier of the labels on the flattened map, 10 outputs). For each row count (fewer and more rows than columns),
projection (``weights``: top singular directions of each channel's weight block; ``pool``: pooled sub-blocks) and
columns per channel ``s``, the greedy path on the compressed problem gives a mask per keep count, whose error is
then evaluated under the *exact* problem (its exact refit) and compared with the exact problem's own greedy path;
with few rows also on held-out images (the exact problem then overfits).

Part 2 (cost at VGG-11 size): 512 channels x 49 columns -> 4096 outputs, ``N`` rows of synthetic spatially
correlated data: accumulation, the compressed selection curve (``s = 4608 // 512 = 9``) and the exact refit in
sample space at half the channels; the exact Gram matrix (25088^2 float64 = 5.0 GB) is never formed.

Run from the repository root::

    python -m benchmarks.wide_consumers
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, machine, trained_model  # noqa: E402
from orprune.examples.datasets import load_default  # noqa: E402
from orprune.layer import greedy_path  # noqa: E402
from orprune.layer.problem import StatisticsAccumulator  # noqa: E402
from orprune.layer.wide import WideAccumulator, channel_projection  # noqa: E402

RIDGE = 1e-4  # relative to the mean diagonal, as Pruner's default


def features(n_images: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained ResNet-20's last feature map (before global pooling), flattened: (n, 64 * 7 * 7)."""
    model, _ = trained_model("resnet20", epochs=1, log=None)
    images, labels, _ = load_default("train")
    out = []
    with torch.no_grad():
        for start in range(offset, offset + n_images, 512):
            x = images[start : min(start + 512, offset + n_images)]
            x = model.layer3(model.layer2(model.layer1(torch.relu(model.bn1(model.conv1(x))))))
            out.append(x.flatten(1))
    return torch.cat(out), labels[offset : offset + n_images]


def cpu() -> float:
    return time.process_time()


def quality(n_rows_list: list[int], sketches: list[int], held_out: int) -> list[str]:
    x_all, labels = features(max(n_rows_list) + held_out)
    x_all = x_all.double().numpy()
    x_test, x_all = x_all[-held_out:], x_all[:-held_out]
    labels = labels[: len(x_all)].numpy()
    n_channels, g = 64, 49
    rng = np.random.default_rng(0)
    onehot = np.eye(10)[labels]
    xc = x_all - x_all.mean(0)
    h = xc.T @ xc
    h[np.diag_indices_from(h)] += 1e-2 * np.mean(np.diag(h))
    maps = {"random": rng.normal(size=(n_channels * g, 256)) / np.sqrt(n_channels * g),
            "trained": np.linalg.solve(h, xc.T @ (onehot - onehot.mean(0)))}
    counts = [16, 32, 48]
    lines = ["| map | rows N | projection | s | " + " | ".join(f"k={k} exact f / greedy f" for k in counts)
             + " | held-out k=32 (greedy exact: ours) | select CPU s |", "|" + "---|" * (6 + len(counts))]
    for name, w in maps.items():
        for n_rows in n_rows_list:
            x, y = x_all[:n_rows], x_all[:n_rows] @ w
            exact_acc = StatisticsAccumulator(n_channels * g, w.shape[1]).update(x, y)
            gram = exact_acc.statistics(center=True)[0]
            ridge = RIDGE * np.mean(np.diag(gram))
            exact = exact_acc.to_problem(group_size=g, ridge=ridge, center=True)
            t = cpu()
            order = greedy_path(exact, max(counts))[0]
            exact_time = cpu() - t
            base = {k: exact.objective(mask_of(order, n_channels, k)) for k in counts}
            test_base = held_out_error(exact, exact_acc.means(), mask_of(order, n_channels, 32), x_test, w)
            lines.append(f"| {name} | {n_rows} | exact (g = 49) | 49 | "
                         + " | ".join(f"{base[k] / exact.yy:.4g}" for k in counts)
                         + f" | {test_base:.4g} | {exact_time:.1f} |")
            for method in ("weights", "pool"):
                for s in sketches:
                    acc = WideAccumulator(channel_projection(w, n_channels, g, s, method), w.shape[1]).update(x, y)
                    prob = acc.to_problem(ridge=ridge, center=True)
                    t = cpu()
                    order = greedy_path(prob.selection, max(counts))[0]
                    took = cpu() - t
                    ratios = [exact.objective(mask_of(order, n_channels, k)) / base[k] for k in counts]
                    test = held_out_error(prob, prob.means, mask_of(order, n_channels, 32), x_test, w)
                    lines.append(f"| {name} | {n_rows} | {method} | {s} | "
                                 + " | ".join(f"{r:.4f}" for r in ratios) + f" | {test_base:.4g}: {test:.4g} | "
                                 + f"{took:.1f} |")
            print("\n".join(lines[-1 - 2 * len(sketches):]), flush=True)
    return lines


def mask_of(order: np.ndarray, n_channels: int, k: int) -> np.ndarray:
    mask = np.zeros(n_channels, dtype=bool)
    mask[order[:k]] = True
    return mask


def held_out_error(problem, means, mask: np.ndarray, x_test: np.ndarray, w: np.ndarray) -> float:
    """Relative error on held-out rows of the exact refit of ``mask`` (intercept from the calibration means)."""
    weights = problem.refit(mask)[0]
    y_test = x_test @ w
    pred = (x_test - means[0]) @ weights + means[1]
    return float(np.sum((y_test - pred) ** 2) / np.sum((y_test - y_test.mean(0)) ** 2))


def scale(n_rows: int, batch: int) -> list[str]:
    from orprune.layer.wide import sketch_size

    torch.manual_seed(0)
    n_channels, g, n_out = 512, 49, 4096
    s = sketch_size(n_channels, g, 4608)
    weights = torch.randn(n_channels * g, n_out, dtype=torch.float64) / np.sqrt(n_channels * g)
    projection = channel_projection(weights.numpy(), n_channels, g, s)
    smooth = torch.nn.functional.avg_pool2d  # spatially correlated 7x7 maps
    acc = WideAccumulator(projection, n_out)
    t, wall = cpu(), time.perf_counter()
    for start in range(0, n_rows, batch):
        maps = torch.relu(smooth(torch.randn(min(batch, n_rows - start), n_channels, 9, 9), 3, 1))
        x = maps.flatten(1)
        acc.update(x, (x.double() @ weights).float())
    accumulate = (cpu() - t, time.perf_counter() - wall)
    prob = acc.to_problem(ridge=RIDGE * acc.mean_diagonal(center=True), center=True)
    acc.release()
    t, wall = cpu(), time.perf_counter()
    order = greedy_path(prob.selection, n_channels // 2)[0]
    select = (cpu() - t, time.perf_counter() - wall)
    t, wall = cpu(), time.perf_counter()
    _, value = prob.refit(mask_of(order, n_channels, n_channels // 2))
    refit = (cpu() - t, time.perf_counter() - wall)
    rows_mb = (prob.rows[0].nbytes + prob.rows[1].nbytes) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return ["| rows N | s | accumulate CPU / wall s | greedy path to k=256 CPU / wall s | exact refit k=256 "
            "CPU / wall s | exact rel. error | stored rows MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|",
            f"| {n_rows} | {s} | {accumulate[0]:.1f} / {accumulate[1]:.1f} | {select[0]:.1f} / {select[1]:.1f} | "
            f"{refit[0]:.1f} / {refit[1]:.1f} | {value / prob.yy:.4g} | {rows_mb:.0f} | {peak:.0f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 8192], help="calibration rows (part 1)")
    parser.add_argument("--sketches", type=int, nargs="+", default=[1, 4, 9], help="columns per channel s")
    parser.add_argument("--held-out", type=int, default=2048, help="held-out images (part 1)")
    parser.add_argument("--scale-rows", type=int, default=1024, help="rows at VGG size (part 2); 0 skips it")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    command = "python -m benchmarks.wide_consumers " + " ".join(sys.argv[1:])
    lines = [f"`{command}`", "", f"Machine: {machine()}, {args.threads} thread(s). Errors are relative to "
             "||Y - mean||^2.", "", "## Selection on compressed columns, evaluated under the exact problem", "",
             "Entries: the exact problem's error of the compressed greedy mask over that of the exact problem's greedy "
             "mask (1 = as good; < 1 better). Exact rows: the exact greedy's relative error.", ""]
    lines += quality(args.rows, args.sketches, args.held_out)
    if args.scale_rows:
        lines += ["", "## VGG-11 size (512 x 7 x 7 -> 4096), synthetic data", ""] + scale(args.scale_rows, 256)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "wide_consumers.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
