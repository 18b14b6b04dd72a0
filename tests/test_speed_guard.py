"""The compile's speed guard (pipeline.policy.prefer_faster): a recipe with a fidelity policy never returns a model
slower than an earlier stage output that also meets the policy.

The stage outputs are real models (a conv chain and noisy copies of it) measured by the real fidelity floor on a
validate split; only the latencies come from a table, so each case states which stage is faster."""
from __future__ import annotations

import numpy as np
import pytest

import edgec.testing.prune_models as pm
from edgec.passes.base import PassContext
from edgec.passes.floor import FloorSpec
from edgec.pipeline.policy import prefer_faster
from edgec.pipeline.runner import RunResult, StageRecord


class TableProbe:
    """Latency by model identity (the TargetProbe method prefer_faster uses)."""

    def __init__(self, table: dict[int, float]):
        self.table, self.calls = table, 0

    def compare_latency_ms(self, models, runs=None):
        self.calls += 1
        return [self.table[id(m)] for m in models]


def _stage(name: str, exact: bool) -> StageRecord:
    return StageRecord(name=name, exact=exact, options={}, seconds=0.0, modified=True, stats={},
                       error_vs_previous=0.0, fidelity_vs_original={}, costs={}, nodes=0)


def _setup(lat: dict[str, float], prune_noise: float, quant_noise: float, policy: bool = True):
    ref = pm.chain()
    r = np.random.default_rng(3)
    feeds = [{"input": r.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(32)]
    stages = [("normalize", True, ref), ("cleanup", True, ref),
              ("prune", False, pm.noisy_copy(ref, prune_noise, seed=1)),
              ("quant", False, pm.noisy_copy(ref, quant_noise, seed=1))]
    res = RunResult(model=stages[-1][2], stages=[_stage(n, e) for n, e, _ in stages], models=[m for *_, m in stages])
    probe = TableProbe({id(m): lat[n] for n, _, m in stages if n in lat})
    spec = FloorSpec(min_cosine=0.999, cosine_scope="all", samples=32) if policy else None
    ctx = PassContext(calib_batches=lambda: iter(feeds), validate_batches=lambda: iter(feeds), reference_model=ref,
                      target_probe=probe, fidelity=spec)
    return res, ctx, probe


@pytest.mark.parametrize("lat,prune_noise,expect", [
    ({"cleanup": 4.0, "prune": 3.9, "quant": 7.4}, 0.0, "cleanup"),   # quant slower; prune within 3% of cleanup
    ({"cleanup": 4.0, "prune": 3.0, "quant": 7.4}, 0.0, "prune"),     # prune clearly fastest and meets the policy
    ({"cleanup": 4.0, "prune": 3.0, "quant": 7.4}, 0.5, "cleanup"),   # prune fastest but breaks the policy
    ({"cleanup": 4.0, "prune": 3.5, "quant": 2.0}, 0.0, "quant"),     # the recipe's result is the fastest
    ({"cleanup": 4.0, "prune": 3.5, "quant": 3.55}, 0.0, "quant"),    # within the margin: the recipe's result
])
def test_returns_the_fastest_stage_that_meets_the_policy(lat, prune_noise, expect):
    res, ctx, probe = _setup(lat, prune_noise, quant_noise=0.0)
    rec: dict = {}
    out = prefer_faster(res, ctx, res.model, rec)
    names = [s.name for s in res.stages]
    assert names[[i for i, m in enumerate(res.models) if m is out][-1]] == expect
    g = rec["speed_guard"]
    assert g["checked"] and g["returned"] == expect and set(g["latency_ms"]) == {"cleanup", "prune", "quant"}
    assert probe.calls == 1  # one interleaved measurement of every candidate
    assert ("note" in g) == (expect != "quant")


def test_no_policy_or_no_probe_keeps_the_recipes_result():
    res, ctx, probe = _setup({"cleanup": 1.0, "prune": 1.0, "quant": 9.0}, 0.0, 0.0, policy=False)
    rec: dict = {}
    assert prefer_faster(res, ctx, res.model, rec) is res.model and not rec["speed_guard"]["checked"]
    res, ctx, probe = _setup({"cleanup": 1.0, "prune": 1.0, "quant": 9.0}, 0.0, 0.0)
    ctx.target_probe = None
    rec = {}
    assert prefer_faster(res, ctx, res.model, rec) is res.model and "probe" in rec["speed_guard"]["note"]
    assert probe.calls == 0
