"""Fit and prune CPU time, peak memory, of a reduced ResNet-50 (one bottleneck per stage), one thread.

For comparing commits on a loaded machine: CPU seconds (``time.process_time``, one torch / BLAS thread)
do not depend on the load the way wall time does. Run
``python -m benchmarks.scale_prune_phase 128 "{'polish_time': None}"`` (calibration images, then Pruner
options as a Python dict literal; ``"{'refit_memory': 0}"``: the refit with one calibration pass per consumer
instead of the streamed pass). Prints fit and prune CPU / wall seconds, the refit's CPU seconds and
``PruneResult.refit`` (path, held activations, node evaluations in forward passes), peak resident memory.
"""

from __future__ import annotations

import ast
import resource
import sys
import time
import warnings

import torch
from threadpoolctl import threadpool_limits

from benchmarks.scale_network import ResNet50


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    import orprune

    torch.set_num_threads(1)
    threadpool_limits(1)
    warnings.simplefilter("ignore")
    n = int(argv[0])
    opts = ast.literal_eval(argv[1]) if len(argv) > 1 else {}
    torch.manual_seed(0)
    model = ResNet50(layers=(1, 1, 1, 1)).eval()
    images = torch.randn(n, 3, 64, 64)
    calibration = [images[i : i + 32] for i in range(0, n, 32)]
    pruner = orprune.Pruner(progress=False, **opts)
    cpu, wall = time.process_time(), time.perf_counter()
    pruner.fit(model, calibration)
    fit_cpu, fit_wall = time.process_time() - cpu, time.perf_counter() - wall
    peak_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    refit_cpu = [0.0]
    if hasattr(pruner, "_refit_updates"):  # CPU seconds of the refit, over every apply of prune
        inner = pruner._refit_updates

        def timed(keep):  # noqa: ANN001, ANN202
            start = time.process_time()
            try:
                return inner(keep)
            finally:
                refit_cpu[0] += time.process_time() - start
        pruner._refit_updates = timed
    cpu, wall = time.process_time(), time.perf_counter()
    result = pruner.prune(macs=0.5)
    prune_cpu, prune_wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{argv} fit cpu {fit_cpu:.1f} wall {fit_wall:.1f} | prune cpu {prune_cpu:.1f} wall {prune_wall:.1f} | "
          f"macs {result.macs_after / result.macs_before:.4f} | rel.err sum "
          f"{sum(u.relative_error for u in result.report):.5f} | polished {len(getattr(result, 'polished', ()))} | "
          f"refit cpu {refit_cpu[0]:.1f}, {_refit(result)} | "
          f"peak fit {peak_fit:.0f} MB, end {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def _refit(result: object) -> str:
    """The last refit's path, seconds and held activations (None before ``PruneResult.refit`` existed)."""
    refit = getattr(result, "refit", None)
    if refit is None:
        return "-"
    held = "" if refit.peak_bytes is None else f", held {refit.peak_bytes / 2**20:.0f} MB"
    passes = "" if refit.passes is None else f", {refit.passes:.2f} passes"
    return f"{refit.path} {refit.seconds:.1f} s wall{held}{passes}"


if __name__ == "__main__":
    main()
