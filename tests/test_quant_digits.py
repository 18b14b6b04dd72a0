"""Digits (real labels): mixed int8/int4 weights >= 8x smaller at <= 1.0 pt accuracy drop; joint pruning +
mixed bits >= 100x fewer weight bits at <= 1.5 pt drop (the claim of adaptive joint compression, Yao et al.
2023). Accuracy is measured in ONNX Runtime on the
emitted Q/DQ graphs, on a held-out split of scikit-learn's digits."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")


def _data():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    Y = d.target.astype(np.int64)
    p = np.random.default_rng(0).permutation(len(X))
    X, Y = X[p], Y[p]
    return X[:1200], Y[:1200], X[1200:], Y[1200:]


def _vgg():
    n = torch.nn
    return n.Sequential(n.Conv2d(1, 32, 3, padding=1), n.ReLU(), n.Conv2d(32, 64, 3, padding=1), n.ReLU(), n.MaxPool2d(2),
                        n.Conv2d(64, 128, 3, padding=1), n.ReLU(), n.MaxPool2d(2), n.Flatten(), n.Linear(512, 128),
                        n.ReLU(), n.Linear(128, 10))


class _Res(torch.nn.Module):
    def __init__(self):
        super().__init__()
        n = torch.nn
        self.stem = n.Conv2d(1, 32, 3, padding=1)
        self.c1 = n.Conv2d(32, 32, 3, padding=1)
        self.c2 = n.Conv2d(32, 32, 3, padding=1)
        self.down = n.Conv2d(32, 64, 3, padding=1, stride=2)
        self.c3 = n.Conv2d(64, 64, 3, padding=1)
        self.c4 = n.Conv2d(64, 64, 3, padding=1)
        self.fc = n.Linear(64, 10)

    def forward(self, x):
        r = torch.relu
        x = r(self.stem(x))
        x = r(x + self.c2(r(self.c1(x))))
        x = r(self.down(x))
        x = r(x + self.c4(r(self.c3(x))))
        return self.fc(x.mean((2, 3)))


def _acc(model, x, y):
    from edgec.core.onnx_io import ort_session

    s = ort_session(model, optimize=True)
    name = model.graph.input[0].name
    return float(np.mean([s.run(None, {name: x[i:i + 1]})[0].argmax() == y[i] for i in range(len(x))])) * 100


@pytest.fixture(scope="module")
def data():
    return _data()


def _trained(make, data, epochs=15):
    from edgec.torchkit.qat import TrainConfig, train_loop
    from edgec.torchkit.export import export_torch

    torch.manual_seed(0)
    xtr, ytr, xte, yte = data
    net = make()
    train_loop(net, xtr, ytr, TrainConfig(epochs=epochs, lr=2e-3))
    m, _ = export_torch(net, (1, 1, 8, 8))
    return net, m, _acc(m, xte, yte)


@pytest.mark.parametrize("make", [_vgg, _Res], ids=["vgg", "resnet"])
def test_mixed_int8_int4_ptq_8x_within_1pt(make, data, tmp_path):
    from edgec.torchkit.qat import allocate_bits
    from edgec.passes.quant.qdq import find_layers, insert_qdq, weight_bits

    xtr, ytr, xte, yte = data
    _, m, a0 = _trained(make, data)
    assert a0 > 95.0
    feeds = [{"input": xtr[i:i + 1]} for i in range(32)]
    bits, _ = allocate_bits(m, feeds, target_bits_per_weight=3.95, cache_dir=str(tmp_path))
    qm, _ = insert_qdq(m, bits, {}, weight_only=True)
    layers = find_layers(m)
    ratio = sum(L.params for L in layers) * 32 / sum(weight_bits(layers, bits).values())
    a1 = _acc(qm, xte, yte)
    print(f"digits {make.__name__}: PTQ mixed bits {bits} -> {ratio:.2f}x smaller weights, acc {a0:.2f} -> {a1:.2f}")
    assert ratio >= 8.0, ratio
    assert a0 - a1 <= 1.0, (a0, a1, bits)


def test_joint_pruning_mixed_bits_100x_within_1_5pt(data, tmp_path):
    from edgec.torchkit.qat import TrainConfig, compress_torch

    xtr, ytr, xte, yte = data
    net, m, a0 = _trained(_vgg, data)
    qm, st = compress_torch(net, xtr, ytr, (1, 1, 8, 8), target_bits_per_weight=0.3, sparsity=0.92,
                            prune_cfg=TrainConfig(epochs=15, lr=1e-3), qat_cfg=TrainConfig(epochs=10, lr=5e-4),
                            cache_dir=str(tmp_path))
    a1 = _acc(qm, xte, yte)
    print(f"digits vgg joint: sparsity {st['sparsity']:.3f}, bits {st['bits']} -> {st['compression']:.1f}x fewer "
          f"weight bits, acc {a0:.2f} -> {a1:.2f}")
    assert st["compression"] >= 100.0, st["compression"]
    assert a0 - a1 <= 1.5, (a0, a1, st["bits"])
    # the emitted graph really stores the low-bit weights: int4 containers and zeros preserved
    from onnx import TensorProto

    assert any(i.data_type == TensorProto.INT4 for i in qm.graph.initializer)


@pytest.mark.parametrize("search", ["alternating", "ga"])
def test_joint_prune_pass_and_bits_under_budget_with_floor(data, tmp_path, search):
    """ONNX-level joint search (prune pass x bit allocation): within budget and above the floor, or says why."""
    from edgec.passes.base import PassContext
    from edgec.passes.quant.joint import JointOptions, joint_compress
    from edgec.passes.quant.qdq import find_layers

    xtr, ytr, xte, yte = data
    _, m, a0 = _trained(_vgg, data)
    n = 200
    feeds = [{"input": xtr[i:i + 1]} for i in range(n)]
    ctx = PassContext(calib_batches=lambda: iter(feeds), calib_labels=ytr[:n], reference_model=m, cache_dir=str(tmp_path))
    params = sum(L.params for L in find_layers(m))
    r = joint_compress(m, ctx, JointOptions(target_bits_per_weight=3.0, max_accuracy_drop=1.5, search=search,
                                            eval_samples=n, ga_population=6, ga_generations=3))
    st = r.stats
    assert st["budget_met"] and st["floor"]["met"]
    assert st["chosen"]["weight_bits"] <= 3.0 * params
    assert st["chosen"]["accuracy_drop"] <= 1.5
    assert a0 - _acc(r.model, xte, yte) <= 3.0  # held-out drop stays near the calibration-measured floor
    # an impossible pair (tiny budget, no drop allowed) never returns a model below the floor, and says so
    r2 = joint_compress(m, ctx, JointOptions(target_bits_per_weight=0.5, max_accuracy_drop=0.0, search="alternating",
                                             eval_samples=n, keep_grid=(1.0, 0.7)))
    assert "note" in r2.stats
    if r2.modified:
        assert r2.stats["chosen"]["accuracy_drop"] <= 0.0 and not r2.stats["budget_met"]
    else:
        assert r2.model is m
