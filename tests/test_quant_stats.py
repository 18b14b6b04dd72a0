"""Streaming activation statistics: results match a one-shot computation and peak RSS does not grow with samples."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgec.testing.prune_models as pm
from edgec.calib.stats import collect_stats
from edgec.core.onnx_io import ort_session

ROOT = Path(__file__).resolve().parent.parent


def test_stats_match_one_shot():
    m = pm.chain()
    r = np.random.default_rng(0)
    feeds = [{"input": r.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(10)]
    name = m.graph.node[1].output[0]  # first relu
    st = collect_stats(m, [name], iter(feeds), moments_for=[name])
    from edgec.calib.activations import with_outputs
    s = ort_session(with_outputs(m, [name]))
    acts = np.concatenate([s.run([name], f)[0] for f in feeds])
    assert st[name].hist.min == pytest.approx(acts.min()) and st[name].hist.max == pytest.approx(acts.max())
    assert st[name].hist.counts.sum() == acts.size
    assert np.allclose(st[name].moments.mean, acts.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert st.samples == 10


_PROBE = r"""
import json, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import edgec.testing.prune_models as pm
from edgec.calib.stats import collect_stats
from edgec.passes.quant.qdq import find_layers, plan_activations
from edgec.passes.quant.dialect import ORT_CPU
n = int(sys.argv[1])
b = pm.GraphBuilder(hw=64)
x = b.act(b.conv("input", 3, 32), "relu")
x = b.act(b.conv(x, 32, 32), "relu")
m = b.build(b.head(x, 32))
layers = find_layers(m)
qt, _ = plan_activations(m, layers, {L.name: 8 for L in layers}, ORT_CPU)
def feeds():
    r = np.random.default_rng(0)
    for i in range(n):
        yield {"input": r.standard_normal((1, 3, 64, 64)).astype(np.float32)}
st = collect_stats(m, qt, feeds(), moments_for=[L.input for L in layers])
assert st.samples == n
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_samples():
    def rss(n):
        out = subprocess.run([sys.executable, "-c", _PROBE, str(n), str(ROOT)], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_kb"]

    small, big = rss(16), rss(256)
    # 256 samples of this net's activations would be ~ 256 * 2 * 32*64*64*4 B = 268 MB if kept; allow 12 MB noise
    assert big - small < 12 * 1024, (small, big)
