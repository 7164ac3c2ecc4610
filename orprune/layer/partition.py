"""Partition pruning (Shahhosseini et al., arXiv 1901.11391): a layer split into P independent blocks.

Inputs and outputs of a Linear layer are assigned to ``P`` balanced parts and only the weights inside a part
are kept, so the layer becomes block diagonal up to permutations (``orprune.network.PartitionedLinear``).
Two criteria:

* without data, the removed weight energy :math:`\\sum_{i,j:\\ p(i) \\ne q(j)} W_{ij}^2`
  (:func:`partition_weights`: an exact MILP in HiGHS for small layers, spectral co-clustering plus alternating
  exact assignments for large ones);
* with data, the least-squares reconstruction error after refitting each output over its part's inputs
  (:func:`orprune.layer.partition_data.partition_layer`: exact by enumeration for tiny layers, alternating
  heuristic otherwise).

Weights use the layout of :class:`~orprune.layer.problem.LayerProblem`: row ``i`` is input ``i``, column ``j``
output ``j`` (pass ``linear.weight.T``). See ``formulations/partition_pruning.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orprune._status import FEASIBLE, OPTIMAL, TIME_LIMIT
from orprune._validation import as_finite_array, check_integer
from orprune.layer._partition_milp import balanced_assignment, energy_milp, part_sizes
from orprune.layer.result import SolverResult, relative_gap

__all__ = ["Partition", "partition_weights", "removed_energy"]

#: ``solver="auto"`` uses the MILP when inputs * outputs * parts is at most this, the heuristic beyond.
AUTO_EXACT_MAX_PRODUCTS = 2048
#: The heuristic adds the MILP's LP-relaxation bound when the model has at most this many product variables.
LP_BOUND_MAX_PRODUCTS = 4096


@dataclass(frozen=True)
class Partition(SolverResult):
    """Balanced parts of a layer's inputs and outputs, the kept weights and the solver's certificate.

    Attributes
    ----------
    input_parts : ndarray of int, shape (inputs,)
        Part of each input, in ``0..P-1``.
    output_parts : ndarray of int, shape (outputs,)
        Part of each output.
    weights : ndarray, shape (inputs, outputs)
        Kept weights, zero between parts: the original weights (energy criterion) or the least-squares refit.
    objective : float
        Removed weight energy, or the reconstruction error (``criterion``).
    bound : float
        A proven lower bound on ``objective`` over all balanced partitions.
    gap : float
    status : str
        ``"optimal"``, ``"time_limit"`` or ``"feasible"``.
    solver : str
    criterion : str
        ``"energy"`` or ``"reconstruction"``.
    solve_time : float
    message : str
    info : mapping
    """

    input_parts: np.ndarray
    output_parts: np.ndarray
    weights: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    solver: str
    criterion: str
    solve_time: float
    message: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_parts(self) -> int:
        return int(max(self.input_parts.max(), self.output_parts.max())) + 1

    @property
    def mask(self) -> np.ndarray:
        """``mask[i, j]``: input ``i`` and output ``j`` share a part."""
        return self.input_parts[:, None] == self.output_parts[None, :]


def _check_parts(n_parts: Any, n_inputs: int, n_outputs: int) -> int:
    return check_integer(n_parts, "n_parts", 1, min(n_inputs, n_outputs))


def _check_time_limit(time_limit: Any) -> None:
    if time_limit is not None and not (np.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"`time_limit` must be a positive number of seconds or None, got {time_limit}.")


def removed_energy(energy: np.ndarray, input_parts: np.ndarray, output_parts: np.ndarray) -> float:
    """``sum_{i,j} E_ij`` over the pairs in different parts."""
    return float(energy[input_parts[:, None] != output_parts[None, :]].sum())


def partition_weights(
    weights: Any,
    n_parts: int,
    *,
    solver: str = "auto",
    time_limit: float | None = None,
    mip_rel_gap: float = 1e-9,
    restarts: int = 4,
    seed: int = 0,
) -> Partition:
    """Balanced partition of a layer's inputs and outputs removing the least weight energy.

    .. math::

        \\min_{p, q}\\ \\sum_{i,j:\\ p(i) \\ne q(j)} W_{ij}^2 \\quad \\text{s.t. every part holds }
        \\lfloor d/P \\rfloor..\\lceil d/P \\rceil \\text{ inputs and } \\lfloor n/P \\rfloor..\\lceil n/P \\rceil
        \\text{ outputs}

    Parameters
    ----------
    weights : array_like, shape (inputs, outputs)
        The layer's weights, one row per input (``linear.weight.T`` for an ``nn.Linear``).
    n_parts : int
        ``P``, between 1 and ``min(inputs, outputs)``.
    solver : {"auto", "exact", "heuristic"}, default "auto"
        ``"exact"``: the MILP in HiGHS, warm-started by the heuristic; ``"heuristic"``: spectral co-clustering and
        random starts, each improved by alternating exact assignments of outputs and inputs; ``"auto"``:
        exact when ``inputs * outputs * P <= AUTO_EXACT_MAX_PRODUCTS``.
    time_limit : float, optional
        Seconds for the MILP (status ``"time_limit"`` with HiGHS's bound when reached).
    mip_rel_gap : float, default 1e-9
        HiGHS's relative gap for ``"exact"``.
    restarts : int, default 4
        Random balanced starts of the heuristic, besides the spectral one.
    seed : int, default 0

    Returns
    -------
    Partition
        With ``criterion="energy"``, ``weights`` the original weights with cross-part entries zeroed.
    """
    start_time = time.perf_counter()
    W = as_finite_array(weights, "weights", ndim=2)
    d, q = W.shape
    P = _check_parts(n_parts, d, q)
    if solver not in ("auto", "exact", "heuristic"):
        raise ValueError(f"`solver` must be 'auto', 'exact' or 'heuristic', got {solver!r}.")
    _check_time_limit(time_limit)
    restarts = check_integer(restarts, "restarts", 0, 10**6)
    if solver == "auto":
        solver = "exact" if d * q * P <= AUTO_EXACT_MAX_PRODUCTS else "heuristic"
    energy = W**2
    total = float(energy.sum())
    parts_in, parts_out = _energy_heuristic(energy, P, restarts, seed)
    info: dict[str, Any] = {}
    if P == 1:
        bound, status, message = 0.0, OPTIMAL, "one part keeps every weight"
    elif solver == "exact":
        out = energy_milp(energy, P, time_limit=time_limit, mip_rel_gap=mip_rel_gap, start=(parts_in, parts_out))
        info = {k: out[k] for k in ("nodes", "rows", "columns")}
        if "input_parts" in out and removed_energy(energy, out["input_parts"], out["output_parts"]) <= \
                removed_energy(energy, parts_in, parts_out):
            parts_in, parts_out = out["input_parts"], out["output_parts"]
        bound, status = max(out["bound"], _energy_bound(energy, P)), out["status"]
        if status not in (OPTIMAL, TIME_LIMIT):
            raise RuntimeError(f"HiGHS failed on the partition MILP: {out['message']}")
        message = f"HiGHS: {out['message']} ({out['nodes']} nodes)"
    else:
        bound, status = _energy_bound(energy, P), FEASIBLE
        message = "spectral co-clustering + alternating exact assignments; bound from the part capacities"
        if d * q * P <= LP_BOUND_MAX_PRODUCTS:
            relaxed = energy_milp(energy, P, time_limit=time_limit, mip_rel_gap=mip_rel_gap, start=None, relax=True)
            if relaxed["status"] == OPTIMAL and relaxed["bound"] > bound:
                bound, message = relaxed["bound"], message.replace("the part capacities", "the LP relaxation")
    objective = removed_energy(energy, parts_in, parts_out)
    bound = min(bound, objective)
    kept = np.where(parts_in[:, None] == parts_out[None, :], W, 0.0)
    return Partition(parts_in.astype(int), parts_out.astype(int), kept, objective, bound,
                     relative_gap(objective, bound, total), status, solver, "energy",
                     time.perf_counter() - start_time, message, info)


def _energy_bound(energy: np.ndarray, P: int) -> float:
    """Removed energy >= total - what a part's capacity lets each output (or each input) keep at best."""
    d, q = energy.shape
    hi_in, hi_out = part_sizes(d, P)[1], part_sizes(q, P)[1]
    per_output = np.sort(energy, axis=0)[::-1][:hi_in].sum()
    per_input = np.sort(energy, axis=1)[:, ::-1][:, :hi_out].sum()
    return max(float(energy.sum()) - min(per_output, per_input), 0.0)


def _random_balanced(rng: np.random.Generator, n_items: int, P: int) -> np.ndarray:
    return rng.permutation(np.arange(n_items) % P)


def _alternate(energy: np.ndarray, P: int, parts_in: np.ndarray, parts_out: np.ndarray,
               max_rounds: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Outputs given inputs, then inputs given outputs, each an exact balanced assignment, until no gain."""
    d, q = energy.shape
    lo_in, hi_in = part_sizes(d, P)
    lo_out, hi_out = part_sizes(q, P)
    value = removed_energy(energy, parts_in, parts_out)
    onehot = np.eye(P)
    for _ in range(max_rounds):
        new_out = balanced_assignment(energy.T @ onehot[parts_in], lo_out, hi_out)
        new_in = balanced_assignment(energy @ onehot[new_out], lo_in, hi_in)
        new_value = removed_energy(energy, new_in, new_out)
        if new_value >= value - 1e-12 * max(value, 1.0):
            break
        parts_in, parts_out, value = new_in, new_out, new_value
    return parts_in, parts_out


def _spectral(energy: np.ndarray, P: int, rng: np.random.Generator) -> np.ndarray:
    """Input parts from the bipartite spectral embedding (Dhillon's co-clustering) and balanced k-means."""
    a = energy + 1e-12 * max(float(energy.max()), np.finfo(float).tiny)
    r, c = a.sum(axis=1), a.sum(axis=0)
    u, _, vt = np.linalg.svd(a / np.sqrt(r)[:, None] / np.sqrt(c)[None, :], full_matrices=False)
    k = max(1, min(P - 1, u.shape[1] - 1))
    rows = u[:, 1:k + 1] / np.sqrt(r)[:, None]
    cols = vt[1:k + 1].T / np.sqrt(c)[:, None]
    points = np.vstack([rows, cols])
    centres = points[rng.choice(len(points), P, replace=False)]
    lo, hi = part_sizes(energy.shape[0], P)
    for _ in range(20):
        dist = ((rows[:, None, :] - centres[None]) ** 2).sum(-1)
        labels = balanced_assignment(-dist, lo, hi)
        centres = np.array([rows[labels == p].mean(axis=0) for p in range(P)])
    return labels


def _energy_heuristic(energy: np.ndarray, P: int, restarts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    d, q = energy.shape
    if P == 1:
        return np.zeros(d, int), np.zeros(q, int)
    rng = np.random.default_rng(seed)
    starts = [_spectral(energy, P, rng)] + [_random_balanced(rng, d, P) for _ in range(restarts)]
    best, best_value = None, math.inf
    for parts_in in starts:
        lo_out, hi_out = part_sizes(q, P)
        parts_out = balanced_assignment(energy.T @ np.eye(P)[parts_in], lo_out, hi_out)
        candidate = _alternate(energy, P, parts_in, parts_out)
        value = removed_energy(energy, *candidate)
        if value < best_value:
            best, best_value = candidate, value
    return best
