"""The selection is exact: argmin without a budget, brute-force optimum of the knapsack with one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from laqonnx.errors import PlanError
from laqonnx.quant.select import Group, Option, select


def _random_groups(rng: np.random.Generator, n_groups: int, max_options: int) -> list[Group]:
    groups = []
    for g in range(n_groups):
        k = int(rng.integers(1, max_options + 1))
        groups.append(
            Group(f"g{g}", tuple(Option(int(rng.integers(0, 20)), float(rng.normal()), key=i) for i in range(k)))
        )
    return groups


def _brute(groups: list[Group], budget: int | None) -> float | None:
    best = None
    for combo in itertools.product(*[g.options for g in groups]):
        cost = sum(o.cost for o in combo)
        if budget is not None and cost > budget:
            continue
        value = sum(o.value for o in combo)
        best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_budgeted_selection_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    groups = _random_groups(rng, int(rng.integers(1, 6)), 4)
    lo = sum(min(o.cost for o in g.options) for g in groups)
    hi = sum(max(o.cost for o in g.options) for g in groups)
    budget = int(rng.integers(lo, hi + 1))
    sel = select(groups, budget)
    chosen = [g.options[i] for g, i in zip(groups, sel.choice)]
    assert sum(o.cost for o in chosen) == sel.cost <= budget
    assert sum(o.value for o in chosen) == pytest.approx(sel.value, abs=1e-12)
    assert sel.value == pytest.approx(_brute(groups, budget), abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_no_budget_is_per_group_argmin(seed):
    rng = np.random.default_rng(100 + seed)
    groups = _random_groups(rng, 4, 5)
    sel = select(groups)
    assert sel.choice == tuple(int(np.argmin([o.value for o in g.options])) for g in groups)
    assert sel.value == pytest.approx(_brute(groups, None))


def test_loose_budget_equals_unconstrained():
    rng = np.random.default_rng(7)
    groups = _random_groups(rng, 5, 4)
    assert select(groups, 10**6).value == pytest.approx(select(groups).value)


def test_infeasible_budget_names_the_minimum():
    groups = [Group("a", (Option(4, 1.0), Option(8, 0.0))), Group("b", (Option(3, 0.5), Option(6, 0.1)))]
    with pytest.raises(PlanError, match="minimum achievable is 7 bits"):
        select(groups, 6, unit="bits")
    sel = select(groups, 7)
    assert sel.choice == (0, 0) and sel.cost == 7


def test_exact_beats_greedy_instance():
    # greedy by value-per-cost upgrades "a" first and then cannot afford "b"; exact takes b.
    groups = [
        Group("a", (Option(0, 1.0), Option(5, 0.0))),
        Group("b", (Option(0, 10.0), Option(6, 0.0))),
    ]
    sel = select(groups, 6)
    assert sel.choice == (0, 1) and sel.value == 1.0


@pytest.mark.parametrize("bad", [dict(cost=-1, value=0.0), dict(cost=1, value=float("nan")), dict(cost=1.5, value=0.0)])
def test_option_validation(bad):
    with pytest.raises(ValueError):
        Option(**bad)
