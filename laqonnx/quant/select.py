"""Selection: one option per group minimising the summed metric, optionally under a budget.

Without a budget the groups are independent and the choice is a per-group argmin (the
consistency property: the per-layer argmin minimises the linearised whole-network bound).
With a budget (total cost <= B, integer costs such as weight bits x parameters, or bytes) it is a
multiple-choice knapsack, solved EXACTLY by dynamic programming over the Pareto frontier of
(cost, value) partial solutions: after each group, states that are dominated (another state costs
no more and has no larger value) are dropped, and states that cannot be completed within the
budget (cost + cheapest completion > B) are dropped. Dominance pruning is exact because every
later group adds the same (cost, value) to both states. The frontier is at most the number of
distinct achievable costs <= B; it is vectorised with numpy.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PlanError

__all__ = ["Option", "Group", "Selection", "select"]


@dataclass(frozen=True)
class Option:
    """One choice within a group: its integer cost, its metric value, and an opaque key."""

    cost: int
    value: float
    key: Hashable = None

    def __post_init__(self) -> None:
        if not isinstance(self.cost, (int, np.integer)) or isinstance(self.cost, bool) or self.cost < 0:
            raise ValueError(f"option cost must be a non-negative int, got {self.cost!r}")
        if not np.isfinite(self.value):
            raise ValueError(f"option value must be finite, got {self.value!r}")
        object.__setattr__(self, "cost", int(self.cost))
        object.__setattr__(self, "value", float(self.value))


@dataclass(frozen=True)
class Group:
    """A group (a layer, or layers sharing an input) from which exactly one option is chosen."""

    name: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"group {self.name!r} has no options")
        object.__setattr__(self, "options", tuple(self.options))


@dataclass(frozen=True)
class Selection:
    """Chosen option index per group, with the total cost and value."""

    choice: tuple[int, ...]
    cost: int
    value: float
    frontier_max: int = 1  # largest Pareto frontier seen by the DP (1 without a budget)


def _argmin(options: Sequence[Option]) -> int:
    # smallest value; ties: cheaper, then earlier
    return min(range(len(options)), key=lambda i: (options[i].value, options[i].cost, i))


def select(groups: Sequence[Group], budget: int | None = None, *, unit: str = "units") -> Selection:
    """Choose one option per group minimising the total value, with total cost <= ``budget``.

    Raises :class:`PlanError` naming the minimum achievable cost when the budget is infeasible.
    """
    groups = list(groups)
    if budget is None:
        choice = tuple(_argmin(g.options) for g in groups)
        cost = sum(g.options[i].cost for g, i in zip(groups, choice))
        value = sum(g.options[i].value for g, i in zip(groups, choice))
        return Selection(choice, cost, value)
    budget = int(budget)
    min_costs = [min(o.cost for o in g.options) for g in groups]
    floor = sum(min_costs)
    if floor > budget:
        raise PlanError(f"the budget ({budget} {unit}) is infeasible: the minimum achievable is {floor} {unit}")
    # cheapest completion after group k
    rest = np.concatenate([np.cumsum(np.array(min_costs[::-1], dtype=np.int64))[::-1][1:], [0]]).astype(np.int64)

    costs = np.zeros(1, dtype=np.int64)
    values = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    widest = 1
    for k, g in enumerate(groups):
        oc = np.array([o.cost for o in g.options], dtype=np.int64)
        ov = np.array([o.value for o in g.options], dtype=np.float64)
        c = (costs[:, None] + oc[None, :]).ravel()
        v = (values[:, None] + ov[None, :]).ravel()
        parent = np.repeat(np.arange(costs.size), oc.size)
        pick = np.tile(np.arange(oc.size), costs.size)
        ok = c + rest[k] <= budget
        c, v, parent, pick = c[ok], v[ok], parent[ok], pick[ok]
        order = np.lexsort((v, c))  # by cost, then value
        c, v, parent, pick = c[order], v[order], parent[order], pick[order]
        # keep a state iff its value is strictly below every cheaper-or-equal state's value
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(v)[:-1]])
        keep = v < best_before
        costs, values = c[keep], v[keep]
        parents.append(parent[keep])
        picks.append(pick[keep])
        widest = max(widest, int(costs.size))
    best = int(np.argmin(values))  # the frontier is sorted by cost: argmin takes the cheapest optimum
    total_cost, total_value = int(costs[best]), float(values[best])
    choice = [0] * len(groups)
    idx = best
    for k in range(len(groups) - 1, -1, -1):
        choice[k] = int(picks[k][idx])
        idx = int(parents[k][idx])
    return Selection(tuple(choice), total_cost, total_value, widest)
