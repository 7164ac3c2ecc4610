"""Budgets met by the counted model: re-allocate while the cost model and the built model disagree.

The allocation MILP meets its MACs / params budgets in the cost model's terms
(:func:`orprune.network.costs.network_costs`); the built model is then counted again by torch-pruning's counter.
Where the two disagree (an operation the cost model does not see, a width rounded by a coupled group), the
budgets the MILP sees are lowered by the measured discrepancy at the chosen allocation, and at least by the
excess, and the allocation is solved again. The correction is exact when the discrepancy is the same at every
allocation, so one or two re-solves suffice in practice; after ``attempts`` the last model is kept (the caller
warns that it is over budget).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from orprune.budget.allocation import Allocation

__all__ = ["meet_counted_budgets"]

#: Relative slack below which a counted cost equals its budget (float rounding of fractions of integer counts).
_SLACK = 1e-9


class _Cost(Protocol):
    def evaluate(self, keep: dict[str, int]) -> float: ...


class _Counted(Protocol):
    macs_after: int
    params_after: int


Built = TypeVar("Built", bound=_Counted)  # the caller's result type (a PruneResult), returned as built


def meet_counted_budgets(allocate_within: Callable[[dict[str, float]], Allocation],
                         build: Callable[[Allocation], Built], costs: Mapping[str, _Cost],
                         budgets: Mapping[str, float], attempts: int = 4) -> Built:
    """The pruned model of the first allocation whose counted MACs and params are within ``budgets``.

    Parameters
    ----------
    allocate_within : callable limits -> Allocation
        Solves the allocation under the given absolute limits (``budgets`` on the first call, lowered after);
        raises ``ValueError`` when they cannot be met.
    build : callable Allocation -> result
        Builds and counts the pruned model of an allocation (a result with ``macs_after`` / ``params_after``).
    costs : mapping name -> cost model
        The allocation's cost model of each budget (``evaluate(keep)`` gives the predicted cost).
    budgets : mapping name -> float
        Absolute budgets; ``"macs"`` and ``"params"`` are checked on the counted model, others (latency)
        are passed through unchanged.
    attempts : int
        Allocations tried at most.
    """
    limits = dict(budgets)
    counted = [n for n in budgets if n in ("macs", "params")]
    result: Built | None = None
    for _ in range(attempts):
        try:
            chosen = allocate_within(dict(limits))
        except ValueError as exc:
            if result is None:
                raise ValueError(f"the budget cannot be met by pruning the prunable groups: {exc}") from exc
            break  # the corrected budget cannot be met: keep the last model
        result = build(chosen)
        achieved = {"macs": result.macs_after, "params": result.params_after}
        excess = {n: achieved[n] - budgets[n] for n in counted if achieved[n] > budgets[n] * (1 + _SLACK)}
        if not excess:
            break
        for n, e in excess.items():
            missed = achieved[n] - costs[n].evaluate(dict(chosen.keep))
            limits[n] = min(limits[n] - e, budgets[n] - missed)
    assert result is not None  # attempts >= 1 and the first failure raises
    return result
