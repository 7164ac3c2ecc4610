"""The budget self-check: re-allocation while the counted model exceeds what the cost model predicted."""

from types import SimpleNamespace

import pytest

from orprune.budget.self_check import meet_counted_budgets

PER_CHANNEL = 10  # the cost model's MACs per kept channel of the one unit "a"


class Cost:
    def evaluate(self, keep: dict[str, int]) -> float:
        return PER_CHANNEL * keep["a"]


def setup(offset: int):
    """An allocation keeping the most channels within the limit, and a build whose counted MACs exceed the
    prediction by ``offset`` (an operation the cost model does not see)."""
    seen: list[dict[str, float]] = []

    def allocate_within(limits: dict[str, float]):
        seen.append(limits)
        k = int(limits["macs"] // PER_CHANNEL)
        if k < 1:
            raise ValueError("no feasible keep count")
        return SimpleNamespace(keep={"a": min(k, 10)})

    def build(chosen):
        return SimpleNamespace(keep=chosen.keep["a"], macs_after=PER_CHANNEL * chosen.keep["a"] + offset,
                               params_after=0)

    return allocate_within, build, seen


def test_constant_discrepancy_is_corrected_in_one_resolve():
    allocate_within, build, seen = setup(offset=7)
    result = meet_counted_budgets(allocate_within, build, {"macs": Cost()}, {"macs": 50.0, "latency": 3.0})
    assert result.keep == 4 and result.macs_after <= 50
    assert [s["macs"] for s in seen] == [50.0, 43.0]
    assert all(s["latency"] == 3.0 for s in seen)  # not a counted budget: passed through


def test_no_discrepancy_allocates_once():
    allocate_within, build, seen = setup(offset=0)
    result = meet_counted_budgets(allocate_within, build, {"macs": Cost()}, {"macs": 50.0})
    assert result.keep == 5 and len(seen) == 1


def test_infeasible_budget_raises_with_the_reason():
    allocate_within, build, _ = setup(offset=0)
    with pytest.raises(ValueError, match="cannot be met by pruning the prunable groups: no feasible"):
        meet_counted_budgets(allocate_within, build, {"macs": Cost()}, {"macs": 5.0})


def test_uncorrectable_budget_keeps_the_last_model():
    allocate_within, build, seen = setup(offset=7)
    result = meet_counted_budgets(allocate_within, build, {"macs": Cost()}, {"macs": 12.0})
    assert result.keep == 1 and result.macs_after > 12  # the caller warns
    assert len(seen) == 2


def test_attempts_bound_the_resolves():
    seen = []

    def allocate_within(limits):
        seen.append(limits)
        return SimpleNamespace(keep={"a": 10})

    def build(chosen):  # always over budget, whatever the limit
        return SimpleNamespace(macs_after=1000, params_after=0)

    meet_counted_budgets(allocate_within, build, {"macs": Cost()}, {"macs": 500.0}, attempts=3)
    assert len(seen) == 3
