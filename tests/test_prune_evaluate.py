"""Masked candidate evaluation (passes/prune/evaluate.py) equals building the pruned model.

For every small graph and every prunable group: the probe's figure and the scored outputs of the masked suffix
session equal those of the physically pruned model (ORT, relative 1e-5); the whole-graph masked session does the
same for several groups at once; and the sensitivity scan through the executor gives identical curves with the
masked and the rebuild evaluation (so the allocation, hence the pruned model, is the same).
"""
from __future__ import annotations

import numpy as np
import pytest

from edgec.passes.base import PassContext
from edgec.passes.prune import evaluate as EV
from edgec.passes.prune.apply import remove_channels
from edgec.passes.prune.graph import analyze, select_channels
from edgec.testing import prune_models as pm


def _ctx(model, n=4):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    name = model.graph.input[0].name

    def feeds():
        rng = np.random.default_rng(7)
        for _ in range(n):
            yield {name: rng.standard_normal(shape).astype(np.float32)}
    return PassContext(calib_batches=feeds)


def _keep(g, frac, seed):
    s = np.random.default_rng(seed).random(g.size)
    k = max(g.align, int(round(frac * g.size / g.align)) * g.align)
    return select_channels(g, s, min(k, g.size - g.align))


class _Recorder(EV.FidelityProbe):
    """The probe, also keeping the last outputs it scored."""

    def score(self, outs):
        self.last = outs
        return super().score(outs)


@pytest.mark.parametrize("name", sorted(pm.GRAPHS))
def test_masked_suffix_equals_pruned_model(name):
    model = pm.GRAPHS[name]()
    groups = analyze(model)
    probe = _Recorder(model, _ctx(model), 4)
    checked = changed = 0
    for g in groups:
        if not g.prunable or g.size < 2 or not EV.maskable(model, [g]):
            continue
        ev = EV.MaskedEval(model, [g], probe, suffix=True)
        for frac, seed in ((0.5, 0), (0.25, 1)):
            idx = _keep(g, frac, seed)
            f_mask = ev({g.id: idx})
            y_mask = probe.last
            f_real = probe(remove_channels(model, {g.id: idx}, groups)[0])
            y_real = probe.last
            for a, b in zip(y_mask, y_real):
                for u, v in zip(a, b):
                    assert pm.rel_diff(u, v) <= 1e-5, (name, g.id)
            assert abs(f_mask - f_real) <= 1e-6
            changed += not np.allclose(y_real[0][0], probe.ref[0][0], rtol=1e-6, atol=0)
            checked += 1
    assert checked and changed, f"{name}: no maskable prunable group whose removal changes the output"


@pytest.mark.parametrize("name", ["residual", "concat", "se", "grouped", "split", "flatten_gemm"])
def test_whole_graph_masks_many_groups(name):
    model = pm.GRAPHS[name]()
    groups = analyze(model)
    cand = [g for g in groups if g.prunable and g.size >= 2]
    probe = _Recorder(model, _ctx(model), 3)
    ev = EV.MaskedEval(model, cand, probe, suffix=False)
    for seed in range(3):
        keep = {g.id: _keep(g, 0.5, seed + g.id) for g in cand}
        f_mask = ev(keep)
        f_real = probe(remove_channels(model, keep, groups)[0])
        assert abs(f_mask - f_real) <= 1e-6
    assert ev.runs == 3


@pytest.mark.parametrize("name", ["residual", "se", "concat"])
def test_scan_masked_equals_rebuild(name):
    model = pm.GRAPHS[name]()
    groups = analyze(model)
    cand = [g for g in groups if g.prunable and g.size >= 2]
    probe = EV.FidelityProbe(model, _ctx(model), 3)
    scores = {g.id: np.random.default_rng(g.id).random(g.size) for g in cand}
    curves = {}
    for masked in (True, False):
        P = EV.make_payload(model, groups, scores, probe, ratios=(0.25, 0.5, 0.75), round_to=1, masked=masked)
        curves[masked] = [EV.scan_group(P, g.id) for g in cand]
    for a, b in zip(curves[True], curves[False]):
        assert a.keys() == b.keys()
        for r in a:
            assert abs(a[r] - b[r]) <= 1e-6
    assert any(v > 0 for c in curves[False] for v in c.values())


@pytest.mark.parametrize("allocation", ["ga", "sensitivity"])
def test_pass_choices_masked_equal_rebuild(allocation):
    """The prune pass chooses the same keep counts with masked and rebuilt candidates (GA and sensitivity)."""
    from edgec.passes.prune.prune_pass import PruneOptions, prune

    model = pm.GRAPHS["residual"]()
    res = {}
    for ev in ("masked", "rebuild"):
        o = PruneOptions(target_macs=0.6, criterion="l1", allocation=allocation, round_to=1, recovery="none",
                         protect_residual=False, fidelity_samples=3, ga_population=6, ga_generations=3,
                         candidate_eval=ev)
        st_ = prune(model, _ctx(model, 6), o).stats
        res[ev] = (st_["keep"], st_["allocation_details"].get("fidelity"), st_["allocation_details"].get("curves"))
    assert res["masked"][0] == res["rebuild"][0]
    if allocation == "ga":
        assert res["masked"][1] == res["rebuild"][1]
    else:
        for g, cur in res["rebuild"][2].items():
            for r, v in cur.items():
                assert abs(res["masked"][2][g][r] - v) <= 1e-5
