"""How far a LayerNorm / GroupNorm over fewer channels is from the norm the selection assumed.

For each case (networks of ``orprune.examples.coverage_zoo`` with norms over the channels), orprune prunes to
``--macs`` of the MACs (greedy curves, MILP allocation) and reports, on held-out random inputs:

* per norm of a pruned unit, ``||N_K(x) - N(x)_K|| / ||N(x)_K||``: the kept channels normalised over the kept
  channels (what the pruned network computes) against the same channels of the norm over every channel (what
  the curves' statistics hold); and the part of that no fixed affine map of the channels absorbs (the least
  squares residual of ``N_K(x)`` on ``[N(x)_K, 1]`` over the samples): what a consumer refit on the original
  statistics cannot undo;
* the relative output error ``||f'(x) - f(x)|| / ||f(x)||`` of three networks with the same kept channels:
  ``full statistics`` (dropped channels still enter the norms' statistics, consumers refit on the original
  statistics: the model the curves assume, not a prunable network), ``original-statistics refit`` (the pruned
  network with that refit: the change of the norms ignored), and ``pruned-statistics refit`` (the default
  sequential refit, whose inputs come from the masked network with its kept-channel norms); and, with its own
  kept channels, the default with ``errors="output"`` (the allocation's per-unit errors measured on the masked
  network, kept-channel norms included).

Run ``python -m benchmarks.channel_norms`` (``--help``); writes ``benchmarks/results/channel_norms.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
import warnings
from datetime import date

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine
from orprune.examples.coverage_zoo import CASES, TRANSFORMERS_CASES
from orprune.network._kept_norms import KeptChannelsNorm, channel_count
from orprune.network.surgery import _masked_weights
from orprune.pipeline import Pruner


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _norm_rows(model, pruner, plan, batches) -> list[str]:
    """One row per norm of a pruned unit: relative change, and the part no affine map absorbs."""
    dropped: dict[str, set[int]] = {}
    for unit_name, kept in plan.keep.items():
        unit = pruner.graph_[unit_name]
        gone = unit.root_channels(np.setdiff1d(np.arange(unit.n_channels), kept))
        for name, channels in unit.norms:
            dropped.setdefault(name, set()).update(channels[r] for r in gone)
    rows = []
    for name, gone in dropped.items():
        module = model.get_submodule(name)
        n = channel_count(module)
        kept = sorted(set(range(n)) - gone)
        hook = KeptChannelsNorm(module, kept)
        inputs: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
        with torch.no_grad():
            for x in batches:
                model(x)
        handle.remove()
        full, ours = [], []
        with torch.no_grad():
            for x in inputs:
                out = module(x)
                dim = hook._dim(x) % x.dim()
                idx = torch.tensor(kept)
                full.append(out.index_select(dim, idx).movedim(dim, -1).reshape(-1, len(kept)))
                ours.append(hook(module, (x,), out).index_select(dim, idx).movedim(dim, -1).reshape(-1, len(kept)))
        full_m, ours_m = torch.cat(full).double(), torch.cat(ours).double()
        design = torch.cat([full_m, torch.ones(len(full_m), 1, dtype=full_m.dtype)], 1)
        fit = design @ torch.linalg.lstsq(design, ours_m).solution
        rows.append(f"| {name} | {type(module).__name__} | {len(kept)} / {n} | {_relative(ours_m, full_m):.3f} | "
                    f"{_relative(ours_m, fit) * float(fit.norm() / ours_m.norm()):.3f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--macs", type=float, default=0.5, help="MACs fraction to keep")
    parser.add_argument("--cases", default="norms,fused_layernorm,hf_convnext", help="comma-separated case names")
    parser.add_argument("--batches", type=int, default=16,
                        help="calibration batches of the case's batch shape (the suite's 3 batches of 8 images "
                             "leave a classifier refit 24 rows: it overfits)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=str(RESULTS_DIR / "channel_norms.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.channel_norms " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    cases = dict(CASES)
    if importlib.util.find_spec("transformers") is not None:
        cases.update(TRANSFORMERS_CASES)
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(cases))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {sorted(cases)}")
    out_rows, norm_rows = [], []
    for name in names:
        model, batches = cases[name]()
        gen = torch.Generator().manual_seed(7)
        held_out = [torch.randn(batches[0].shape, generator=gen) for _ in range(8)]
        batches = batches + [torch.randn(batches[0].shape, generator=gen) for _ in range(args.batches - len(batches))]
        start, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches)
            pruned = pruner.prune(macs=args.macs)
            pruner.sequential = False  # the same keep, consumers refit on the original statistics
            original_refit = pruner.prune(macs=args.macs)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output_errors = Pruner(solver="greedy", progress=False, positions_per_image=8,
                                   errors="output").fit(model, batches).prune(macs=args.macs)
        assert all(np.array_equal(pruned.plan.keep[u], k) for u, k in original_refit.plan.keep.items())
        full_statistics = _masked_weights(model, pruner.graph_, original_refit.plan).eval()
        with torch.no_grad():
            reference = torch.cat([model(x) for x in held_out])
            errors = [_relative(torch.cat([m(x) for x in held_out]), reference)
                      for m in (full_statistics, original_refit.model.eval(), pruned.model.eval(),
                                output_errors.model.eval())]
        macs = pruned.macs_after / pruned.macs_before
        out_rows.append(f"| {name} | {100 * macs:.1f}% | {errors[0]:.3f} | {errors[1]:.3f} | {errors[2]:.3f} | "
                        f"{errors[3]:.3f} ({100 * output_errors.macs_after / output_errors.macs_before:.1f}%) | "
                        f"{seconds:.1f} / {cpu:.1f} |")
        norm_rows += [f"| {name} " + row for row in _norm_rows(model, pruner, pruned.plan, held_out)]
        print(out_rows[-1], flush=True)
    lines = [
        f"Command: `{command}`",
        "",
        f"{date.today().isoformat()}, {machine()}, torch {torch.__version__}, {args.threads} thread(s). "
        f"Target {100 * args.macs:.0f}% of the MACs, random initialisation, {args.batches} calibration batches, "
        "errors on 8 held-out batches of random inputs (formulations/channel_norms.md).",
        "",
        "Relative output error `||f'(x) - f(x)|| / ||f(x)||`, the first three with the same kept channels:",
        "",
        "| network | MACs kept | full statistics (not prunable) | original-statistics refit | "
        "pruned-statistics refit (default) | the same with `errors=\"output\"` (its MACs) | "
        "fit + 2 prunes s (wall / CPU) |",
        "|---|---|---|---|---|---|---|",
        *out_rows,
        "",
        "Each norm of a pruned unit: kept channels normalised over the kept channels against the same channels "
        "normalised over all (relative difference), and the part no fixed affine map of the channels absorbs:",
        "",
        "| network | norm | type | channels kept | relative difference | not affine |",
        "|---|---|---|---|---|---|",
        *norm_rows,
        "",
    ]
    with open(args.output, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
