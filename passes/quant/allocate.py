"""Bit allocation as a multiple-choice knapsack, solved exactly as an integer program (HAWQ-V3 style).

Variables x_{l,b} in {0, 1}: layer l runs at bitwidth b.
  minimize    sum_{l,b} S_{l,b} x_{l,b}                       (measured sensitivities, assumed additive)
  subject to  sum_b x_{l,b} = 1                for every layer l
              sum_{l,b} C_{l,b} x_{l,b} <= B                   (one budget: size bits, bits/weight, or latency)
solved by HiGHS branch-and-bound (scipy.optimize.milp) with zero relative MIP gap, i.e. to optimality.
The Pareto curve sweeps B between the cheapest and the dearest assignment and keeps the non-dominated
(cost, total sensitivity) points.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np

from edgec.core.errors import EdgecError

log = logging.getLogger(__name__)


@dataclass
class Solution:
    bits: dict[str, int]
    objective: float
    cost: float
    budget: float

    def as_dict(self) -> dict:
        return {"bits": dict(self.bits), "objective": self.objective, "cost": self.cost, "budget": self.budget}


def _flatten(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, float]]):
    names = list(sens)
    var = [(l, b) for l in names for b in sorted(sens[l])]
    s = np.array([sens[l][b] for l, b in var], np.float64)
    c = np.array([cost[l][b] for l, b in var], np.float64)
    return names, var, s, c


def min_cost(cost: dict[str, dict[int, float]], sens: dict[str, dict[int, float]]) -> float:
    return float(sum(min(cost[l][b] for b in sens[l]) for l in sens))


@contextlib.contextmanager
def _native_stdout_silenced():
    """fd 1 -> /dev/null while native code runs: stdout carries only the CLI's summary table (-q)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real fd 1 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve(sens: dict[str, dict[int, float]], cost: dict[str, dict[int, float]], budget: float, *,
          fixed_cost: float = 0.0, what: str = "cost") -> Solution:
    """Exact minimum of total sensitivity with sum cost + fixed_cost <= budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    names, var, s, c = _flatten(sens, cost)
    if not var:
        return Solution({}, 0.0, fixed_cost, budget)
    lo = min_cost(cost, sens) + fixed_cost
    if budget < lo - 1e-9 * max(abs(lo), 1.0):
        raise EdgecError(f"{what} budget {budget:.6g} is below the smallest achievable {lo:.6g}")
    A = lil_matrix((len(names), len(var)))
    idx = {l: i for i, l in enumerate(names)}
    for j, (l, _) in enumerate(var):
        A[idx[l], j] = 1.0
    scale = max(float(np.abs(c).max()), 1e-12)
    cons = [LinearConstraint(A.tocsr(), 1, 1),
            LinearConstraint((c / scale)[None, :], -np.inf, (budget - fixed_cost) / scale + 1e-9)]
    # tiny cost tie-break so that equal-sensitivity choices prefer the cheaper one
    obj = s + 1e-12 * c / scale
    with _native_stdout_silenced():  # HiGHS writes solver debug lines to fd 1, past Python's sys.stdout
        res = milp(obj, constraints=cons, integrality=np.ones(len(var)), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0, "presolve": True, "time_limit": 60.0})
    if res.x is None:
        raise EdgecError(f"bit allocation found no solution for {what} budget {budget:.6g} ({res.message})")
    x = np.round(res.x).astype(int)
    bits = {l: b for (l, b), v in zip(var, x) if v}
    return Solution(bits, float(s @ x), float(c @ x) + fixed_cost, float(budget))


def brute_force(sens, cost, budget, fixed_cost: float = 0.0) -> Solution:
    """Exhaustive reference solver for tests (tiny problems only)."""
    import itertools

    names = list(sens)
    best = None
    for combo in itertools.product(*[sorted(sens[l]) for l in names]):
        cs = sum(cost[l][b] for l, b in zip(names, combo)) + fixed_cost
        if cs > budget + 1e-9:
            continue
        ob = sum(sens[l][b] for l, b in zip(names, combo))
        if best is None or ob < best.objective - 1e-15:
            best = Solution(dict(zip(names, combo)), ob, cs, budget)
    if best is None:
        raise EdgecError("infeasible")
    return best


def pareto(sens, cost, *, fixed_cost: float = 0.0, points: int = 16) -> list[Solution]:
    lo = min_cost(cost, sens) + fixed_cost
    hi = float(sum(max(cost[l][b] for b in sens[l]) for l in sens)) + fixed_cost
    out: list[Solution] = []
    for B in np.linspace(lo, hi, points):
        try:
            sol = solve(sens, cost, float(B), fixed_cost=fixed_cost)
        except EdgecError:
            continue
        if not out or sol.objective < out[-1].objective - 1e-15:
            out.append(sol)
    return out


def plot_pareto(front: list[Solution], path: str, *, xlabel: str, chosen: Solution | None = None,
                measured: list[tuple[float, float]] | None = None, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgec.core.onnx_io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.cost for p in front], [p.objective for p in front], "o-", label="Pareto front (predicted)")
    if chosen is not None:
        ax.plot([chosen.cost], [chosen.objective], "r*", ms=14, label="chosen")
    if measured:
        ax2 = ax.twinx()
        ax2.plot([m[0] for m in measured], [m[1] for m in measured], "gs--", label="measured top-1 agreement")
        ax2.set_ylabel("top-1 agreement (measured)")
        ax2.legend(loc="center right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("total sensitivity (sum of per-layer output KL/MSE)")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title or "edgec mixed-bit allocation")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
