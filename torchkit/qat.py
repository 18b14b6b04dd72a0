"""Training-aware joint sparsity + quantization in torch (adaptive joint compression, Yao et al., Chinese Journal of
Scientific Instrument 2023), exported through the same Q/DQ pass.

For every Conv2d / Linear weight W of layer l with bitwidth b_l and binary mask M_l:
  W_eff = FQ_b(W * M),  FQ_b(v) = s * clip(round(v / s), -q, q),  s_c = max|v_c| / q,  q = 2^(b-1) - 1
(per output channel, symmetric, the same quantizer as calib.ranges.quantize_weight), trained with the
straight-through estimator dFQ/dv = 1. Masks follow a gradual global-magnitude schedule (Zhu & Gupta):
sparsity s(t) = s_f (1 - (1 - t/T)^3), threshold = the s(t)-quantile of |W| over all layers, so each layer's
ratio is chosen by the data (layer-adaptive), with at least `min_keep` of every layer kept.
After training the parametrization is folded: weights sit exactly on their quantization grid and zeros stay
zero, so passes.quant.qdq.insert_qdq with the same bits reproduces them bit for bit (q = round(W / s) exact).
Bits per layer come from passes.quant (sensitivity measured on the pruned model + exact knapsack) - see
`allocate_bits` - which makes the whole thing an alternating joint search: prune, measure, allocate, fine-tune.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def _torch():
    import torch

    return torch


def fake_quant(w, bits: int, block: int | None = None):
    """Symmetric fake quantization with a straight-through gradient: per output channel, or (Linear, b < 8,
    in_features > block) per block of `block` inputs - the scheme passes.quant.qdq emits for that layer."""
    torch = _torch()
    if bits >= 32:
        return w
    q = 2 ** (bits - 1) - 1
    if block is not None and w.dim() == 2 and bits < 8 and w.shape[1] > block:
        n, k = w.shape
        nb = -(-k // block)
        pad = nb * block - k
        wp = torch.nn.functional.pad(w.detach().abs(), (0, pad)).reshape(n, nb, block)
        s = (wp.amax(2) / q).clamp_min(1e-12).repeat_interleave(block, dim=1)[:, :k]
    else:
        flat = w.detach().reshape(w.shape[0], -1)
        s = (flat.abs().amax(1) / q).clamp_min(1e-12).reshape([-1] + [1] * (w.dim() - 1))
    wq = torch.clamp(torch.round(w / s), -q, q) * s
    return w + (wq - w).detach()


def _make_param_module():
    torch = _torch()

    class FQMask(torch.nn.Module):
        def __init__(self, shape, bits: int):
            super().__init__()
            self.bits = int(bits)
            self.block = 32
            self.register_buffer("mask", torch.ones(shape))

        def forward(self, w):
            return fake_quant(w * self.mask, self.bits, self.block)

    return FQMask


def layers_of(module) -> dict[str, object]:
    torch = _torch()
    return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def attach(module, bits: dict[str, int]) -> None:
    from torch.nn.utils import parametrize

    FQMask = _make_param_module()
    for n, m in layers_of(module).items():
        if parametrize.is_parametrized(m, "weight"):
            m.parametrizations.weight[0].bits = int(bits.get(n, 32))
        else:
            parametrize.register_parametrization(m, "weight", FQMask(m.weight.shape, bits.get(n, 32)))


def _raw(m):
    return m.parametrizations.weight.original


def set_bits(module, bits: dict[str, int]) -> None:
    for n, m in layers_of(module).items():
        m.parametrizations.weight[0].bits = int(bits.get(n, 32))


def update_masks(module, sparsity: float, *, min_keep: float = 0.02, fixed: dict[str, float] | None = None) -> dict[str, float]:
    """Global magnitude masks at overall `sparsity`; returns the kept fraction per layer."""
    torch = _torch()
    ls = layers_of(module)
    with torch.no_grad():
        mags = torch.cat([_raw(m).abs().flatten() for m in ls.values()])
        k = int(sparsity * mags.numel())
        thr = torch.kthvalue(mags, k).values if k > 0 else torch.tensor(-1.0)
        kept = {}
        for n, m in ls.items():
            w = _raw(m).abs()
            if fixed and n in fixed:
                kk = max(1, int(round(fixed[n] * w.numel())))
                t = torch.topk(w.flatten(), kk).values[-1]
                mask = (w >= t).float()
            else:
                mask = (w > thr).float()
                need = max(1, int(np.ceil(min_keep * w.numel())))
                if mask.sum() < need:
                    t = torch.topk(w.flatten(), need).values[-1]
                    mask = (w >= t).float()
            m.parametrizations.weight[0].mask.copy_(mask)
            kept[n] = float(mask.mean())
    return kept


def strip(module) -> None:
    """Fold mask + fake quant into plain weights (on-grid values, exact zeros)."""
    from torch.nn.utils import parametrize

    for m in layers_of(module).values():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    batch: int = 64
    weight_decay: float = 0.0
    seed: int = 0


def train_loop(module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
               on_epoch: Callable[[int], None] | None = None) -> None:
    torch = _torch()
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.epochs, 1))
    X, Y = torch.from_numpy(x), torch.from_numpy(y).long()
    for ep in range(cfg.epochs):
        if on_epoch:
            on_epoch(ep)
        module.train()
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), cfg.batch):
            idx = perm[i:i + cfg.batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(X[idx]), Y[idx])
            loss.backward()
            opt.step()
        sched.step()
    module.eval()


def prune_train(module, x, y, *, sparsity: float, cfg: TrainConfig, min_keep: float = 0.02) -> dict[str, float]:
    """Gradual global-magnitude pruning with fine-tuning (weights float): returns kept fraction per layer."""
    attach(module, {})
    ramp = max(cfg.epochs * 2 // 3, 1)
    kept = {}

    def on_epoch(ep):
        t = min(ep + 1, ramp) / ramp
        kept.update(update_masks(module, sparsity * (1 - (1 - t) ** 3), min_keep=min_keep))

    train_loop(module, x, y, cfg, on_epoch)
    return kept


def qat(module, x, y, bits: dict[str, int], cfg: TrainConfig) -> None:
    """Fine-tune with fake quantization at `bits` (masks, if attached, stay fixed)."""
    attach(module, bits)
    set_bits(module, bits)
    train_loop(module, x, y, cfg)


def onnx_layer_map(module, model) -> dict[str, str]:
    """torch module name -> ONNX layer name (passes.quant.qdq naming), matched by weight values."""
    from onnx import numpy_helper

    from edgec.passes.quant.qdq import find_layers

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n, m in layers_of(module).items():
        w = m.weight.detach().numpy()
        for L in find_layers(model):
            a = inits[L.weight]
            if a.shape == w.shape and np.array_equal(a, w):
                out[n] = L.name
                break
    return out


def allocate_bits(model, feeds, *, target_bits_per_weight: float, candidates=(8, 4, 3, 2), keep: dict[str, float] | None = None,
                  dialect=None, cache_dir: str | None = None) -> tuple[dict[str, int], dict]:
    """Bits per ONNX layer: weight-only sensitivity on `model` (the pruned one) + exact knapsack on nonzero bits."""
    from edgec.passes.quant import allocate
    from edgec.passes.quant.dialect import ORT_CPU
    from edgec.passes.quant.qdq import find_layers, weight_bits
    from edgec.passes.quant.sensitivity import measure_sensitivity

    dialect = dialect or ORT_CPU
    layers = find_layers(model)
    cands = {L.name: list(candidates) for L in layers}
    sens = measure_sensitivity(model, layers, cands, {}, dialect, feeds, metric="kl", cache_dir=cache_dir,
                               weight_only=True)
    nz = keep or {}
    cost = {L.name: {b: weight_bits([L], {L.name: b}, block_size=dialect.int4_block_size,
                                    keep={L.name: nz.get(L.name, 1.0)})[L.name] for b in sens[L.name]} for L in layers}
    budget = target_bits_per_weight * sum(L.params for L in layers)
    lo = allocate.min_cost(cost, sens)
    sol = allocate.solve(sens, cost, max(budget, lo), what="bits")
    return sol.bits, {"sensitivity": sens, "cost_bits": sol.cost, "budget_bits": budget}


def _export(module, input_shape):
    from edgec.torchkit.export import export_torch

    m, _ = export_torch(module.eval(), tuple(input_shape))
    return m


def _nonzero_keep(model) -> dict[str, float]:
    from onnx import numpy_helper

    from edgec.passes.quant.qdq import find_layers

    inits = {i.name: i for i in model.graph.initializer}
    return {L.name: float((numpy_helper.to_array(inits[L.weight]) != 0).mean()) for L in find_layers(model)}


def compress_torch(module, x_train: np.ndarray, y_train: np.ndarray, input_shape, *, target_bits_per_weight: float,
                   sparsity: float = 0.0, prune_cfg: TrainConfig | None = None, qat_cfg: TrainConfig | None = None,
                   candidates=(8, 4, 3, 2), calib: int = 32, min_keep: float = 0.02, cache_dir: str | None = None):
    """Seed-004 training-aware joint compression; returns (Q/DQ ONNX model, stats).

    1. (sparsity > 0) gradual global-magnitude pruning with fine-tuning -> layer-adaptive kept fractions
    2. export; per-layer weight sensitivity on the *pruned* model; exact knapsack on nonzero weight bits
       (sum_l nnz_l * b_l + 32 * scales_l <= target_bits_per_weight * params) -> b_l
    3. fine-tune with masks fixed and fake quantization at b_l (STE); fold; export; emit Q/DQ (weight-only)
    Weight bits count nonzero weights x bits plus every fp32 scale; sparse-index storage is not counted.
    """
    import copy

    from edgec.passes.quant.qdq import find_layers, insert_qdq, weight_bits

    net = copy.deepcopy(module)
    kept = {}
    if sparsity > 0:
        kept = prune_train(net, x_train, y_train, sparsity=sparsity, cfg=prune_cfg or TrainConfig(), min_keep=min_keep)
        strip(net)
    m = _export(net, input_shape)
    names = onnx_layer_map(net, m)
    keep = _nonzero_keep(m)
    feeds = [{m.graph.input[0].name: x_train[i:i + 1]} for i in range(min(calib, len(x_train)))]
    bits_onnx, info = allocate_bits(m, feeds, target_bits_per_weight=target_bits_per_weight, candidates=candidates,
                                    keep=keep, cache_dir=cache_dir)
    bits_t = {n: bits_onnx[l] for n, l in names.items()}
    attach(net, bits_t)
    for n, mod in layers_of(net).items():  # masks = the pruned pattern (zeros stay zero)
        mod.parametrizations.weight[0].mask.copy_((_raw(mod) != 0).float())
    train_loop(net, x_train, y_train, qat_cfg or TrainConfig(epochs=8, lr=5e-4))
    strip(net)
    m2 = _export(net, input_shape)
    names2 = onnx_layer_map(net, m2)
    b2 = {names2[n]: b for n, b in bits_t.items() if n in names2}
    qm, qinfo = insert_qdq(m2, b2, {}, weight_only=True)
    layers = find_layers(m2)
    keep2 = _nonzero_keep(m2)
    total = sum(weight_bits(layers, b2, keep=keep2).values())
    params = sum(L.params for L in layers)
    stats = {"bits": b2, "kept_fraction": keep2, "sparsity": 1 - sum(keep2[L.name] * L.params for L in layers) / params,
             "weight_bits": total, "fp32_weight_bits": params * 32, "compression": params * 32 / total,
             "sensitivity": info["sensitivity"], "accounting": "nonzero weights x bits + 32 bits per scale; no index storage"}
    return qm, stats
