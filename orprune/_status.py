"""One status vocabulary for every orprune solver.

Backends map their own codes onto these strings through a single table each, so callers never
have to know which solver produced a result.
"""

from __future__ import annotations

OPTIMAL = "optimal"  # certified: objective == bound within the requested gap
FEASIBLE = "feasible"  # a valid solution from a heuristic, no optimality claim
TIME_LIMIT = "time_limit"  # stopped by the time limit; incumbent, bound and gap are reported
INFEASIBLE = "infeasible"  # the constraints admit no solution

#: Statuses that come with a usable solution.
SOLUTION_PRESENT = frozenset({OPTIMAL, FEASIBLE, TIME_LIMIT})
ALL_STATUSES = frozenset({OPTIMAL, FEASIBLE, TIME_LIMIT, INFEASIBLE})
