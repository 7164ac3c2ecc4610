"""Layer solvers, registered by name (see :mod:`orprune.layer.solvers.registry`)."""

from orprune.layer.solvers.registry import SOLVERS, SolverSpec, available_solvers, get_solver, register_solver

# Importing a solver module registers it.
from orprune.layer.solvers import bnb, exact, greedy, lasso, local_search, magnitude, paths, perspective  # noqa: E402,F401  isort: skip

__all__ = ["SOLVERS", "SolverSpec", "available_solvers", "get_solver", "register_solver"]
