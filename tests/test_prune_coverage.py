"""Channel removal on real torchvision graphs: export, cleanup, analyze, prune ~30% of every prunable group by
L1 of its producer weights, then the model passes the checker, runs in ORT with the original output shape, and
CostModel agrees with count_costs of the pruned graph (within 1%; it is exact by construction)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from edgec.passes.base import PassContext
from edgec.passes.cleanup import CleanupOptions, cleanup
from edgec.passes.costs import count_costs
from edgec.passes.prune.apply import remove_channels
from edgec.passes.prune.graph import CostModel, analyze, producer_weights, round_keep, select_channels
from edgec.torchkit.export import export_torch
from edgec.core.onnx_io import check_model, ort_session, run_session

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0", "squeezenet1_1"]
SIZE = 128


@functools.lru_cache(maxsize=None)
def _export(name):
    import torch
    import torchvision

    torch.manual_seed(0)
    module = getattr(torchvision.models, name)(weights=None).eval()
    model, _ = export_torch(module, (1, 3, SIZE, SIZE))
    return cleanup(model, PassContext(calib_batches=lambda: iter([])), CleanupOptions()).model


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_prune_torchvision(name):
    model = _export(name)
    groups = analyze(model)
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) >= 10, [g.reason for g in groups if not g.prunable][:5]
    keep = {}
    for g in prunable:
        k = round_keep(g, 0.7 * g.size, 1)
        if k < g.size:
            ws = producer_weights(model, g)
            assert ws and all(w.shape[0] == g.size for w in ws)
            keep[g.id] = select_channels(g, sum(np.abs(w).sum(1) for w in ws), k)
    pruned, stats = remove_channels(model, keep, groups)
    assert stats["groups_pruned"] == len(keep) > 0
    check_model(pruned)
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    y0 = run_session(ort_session(model), {"input": x})[0]
    y = run_session(ort_session(pruned), {"input": x})[0]
    assert y.shape == y0.shape and np.isfinite(y).all()
    cm = CostModel(model, groups)
    macs, params = cm.costs({gid: len(v) for gid, v in keep.items()})
    real = count_costs(pruned)
    assert abs(macs - real.macs) <= 0.01 * real.macs and abs(params - real.params) <= 0.01 * real.params
    assert real.macs < 0.85 * cm.base_macs
    assert pruned.ByteSize() < model.ByteSize()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0"])
def test_real_model_removal_exact_under_zeroed_consumers(name):
    """On real graphs (SE, HardSwish/SiLU, channel shuffle, Flatten->Gemm): zero the consumer weights of a third of
    every prunable group's channels, remove those channels, and the outputs match within 1e-5 relative."""
    from edgec.passes.prune.graph import consumer_layers
    from edgec.testing import prune_models as pm

    model = _export(name)
    groups = analyze(model)
    rng = np.random.default_rng(0)
    zeroed, keep = model, {}
    for g in groups:
        if not g.prunable:
            continue
        bs = g.size // g.align
        rm = np.sort(np.concatenate([b * bs + rng.choice(bs, max(1, bs // 3), replace=False) for b in range(g.align)]))
        zeroed = pm.zero_consumer_inputs(zeroed, consumer_layers(zeroed, g), rm)
        keep[g.id] = np.setdiff1d(np.arange(g.size), rm)
    pruned, stats = remove_channels(zeroed, keep, groups)
    assert stats["groups_pruned"] == len(keep) >= 10
    x = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    y0, yz, yp = pm.run(model, x), pm.run(zeroed, x), pm.run(pruned, x)
    assert pm.rel_diff(yz, y0) > 1e-5
    assert pm.rel_diff(yp, yz) <= 1e-5
