"""The pruning papers' headline on real labels (issue 3, Done-when 3): sklearn digits at 32x32, VGG- and
ResNet-style nets trained
here; prune + a short KD fine-tune removes >= 90% of params and >= 70% of MACs at <= 1.0 point accuracy drop.
Also the ADMM L0 sparse training (ADMM + GA pruning patent, CN 2021) of per-channel scaling factors, then
pruning by those factors."""
import numpy as np
import pytest

from edgec.testing.digits import accuracy, make_digits_data, resnet_net, train, vgg_net

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    import torch

    torch.set_num_threads(2)
    return make_digits_data(0)


def _onnx(net):
    from edgec.passes.base import PassContext, get_pass, make_options
    from edgec.torchkit.export import export_torch

    m, _ = export_torch(net, (1, 1, 32, 32))
    spec = get_pass("cleanup")
    return spec.fn(m, PassContext(calib_batches=lambda: iter([])), make_options(spec, {})).model


def _prune(m, net, xtr, ytr, **opts):
    from edgec.passes.base import PassContext, get_pass, make_options

    ctx = PassContext(calib_batches=lambda: ({"input": xtr[i:i + 1]} for i in range(64)), calib_labels=ytr[:64],
                      train_data=(xtr, ytr), torch_model=net, seed=0)
    spec = get_pass("prune")
    return spec.fn(m, ctx, make_options(spec, opts))


@pytest.mark.parametrize("make", [vgg_net, resnet_net], ids=["vgg", "resnet"])
def test_digits_prune_finetune_headline(data, make):
    from edgec.passes.costs import count_costs

    xtr, ytr, xte, yte = data
    net = train(make(32), xtr, ytr, epochs=5, seed=0)
    a0 = accuracy(net, xte, yte)
    assert a0 >= 0.97
    m = _onnx(net)
    res = _prune(m, net, xtr, ytr, target_params=0.095, criterion="l1", allocation="global", round_to=4,
                 recovery="lstsq", protect_residual=False, finetune_epochs=10, finetune_lr=3e-3)
    c0, c1 = count_costs(m), count_costs(res.model)
    a1 = accuracy(res.model, xte, yte)
    print(f"digits {make.__name__}: params {c1.params / c0.params:.3f}, MACs {c1.macs / c0.macs:.3f}, "
          f"acc {a0:.4f} -> {a1:.4f}")
    assert c1.params <= 0.10 * c0.params
    assert c1.macs <= 0.30 * c0.macs
    assert a1 >= a0 - 0.010
    assert res.stats["finetune"]["parameters_written"] > 0


def test_digits_admm_l0_then_prune_by_scaling_factors(data):
    import torch

    from edgec.passes.costs import count_costs
    from edgec.torchkit.prune_tools import admm_sparse_train, scaling_factors

    xtr, ytr, xte, yte = data
    net = train(vgg_net(16), xtr, ytr, epochs=3, seed=1)
    a_dense = accuracy(net, xte, yte)
    g0 = torch.cat([g.detach().abs().flatten() for g in scaling_factors(net)]).numpy()
    rho = 0.5
    lam = rho / 2 * float(np.percentile(g0, 20)) ** 2  # hard threshold |gamma + u| <= sqrt(2 lam / rho) at the 20th pct
    st = admm_sparse_train(net, xtr, ytr, iterations=3, epochs_per_iter=1, lam=lam, rho=rho, gamma_lr=1e-2,
                           polish_epochs=3, seed=1)
    zf = st["zero_fraction"]
    assert 0.1 <= zf <= 0.8, st["history"]
    gam = torch.cat([g.detach().flatten() for g in scaling_factors(net)])
    assert float((gam == 0).float().mean()) == pytest.approx(zf, abs=1e-6)  # z = 0 channels projected to gamma = 0
    a_sparse = accuracy(net, xte, yte)
    assert a_sparse >= 0.9
    # prune by the learned factors (BN folded into the convs: gamma = 0 -> zero rows -> lowest score), short KD
    m = _onnx(net)
    res = _prune(m, net, xtr, ytr, target_params=0.8, criterion="bn_scale", allocation="global", round_to=1,
                 recovery="lstsq")
    a1 = accuracy(res.model, xte, yte)
    print(f"digits admm: zero fraction {zf:.3f}, acc dense {a_dense:.4f}, ADMM {a_sparse:.4f}, pruned {a1:.4f}")
    assert count_costs(res.model).params <= 0.8 * count_costs(m).params
    assert a1 >= a_sparse - 0.01  # channels the ADMM zeroed carry (almost) nothing: removal needs no retraining
