"""Torch-side helpers for pruning: Taylor scores, KD fine-tuning and ADMM L0 sparse training.

Taylor (first order; the gradient importance of the adaptive-threshold method, Wang et al., Computer Engineering
2022):  s_c = E_x |sum_p a_c(p) dL/da_c(p)|. For a producer y = W x + b (Conv/Gemm),
    sum_p a_c(p) dL/da_c(p) = <W_c, dL/dW_c> + b_c dL/db_c,
so the score needs only per-sample parameter gradients of the ONNX graph converted with onnx2torch (scoring only).
Loss: cross-entropy on labels when given, else the cross-entropy to the original model's own softmax sharpened by
a temperature T < 1 (the KL to the unmodified original is identically 0 with zero gradient, so its first non-vanishing
surrogate is used).

Distillation recovery (distill_onnx, the prune pass's `recovery: distill`): the pruned ONNX model, converted with
onnx2torch, is fine-tuned toward the unpruned one on unlabeled fit inputs, L = T^2 KL(softmax(t/T) || softmax(s/T))
on classifier outputs and |s - t|^2 / |t|^2 on the others, then written back and re-verified like any pass.

KD fine-tuning:  L = CE(y, label) + T^2 KL(softmax(t/T) || softmax(s/T)), student = pruned ONNX via onnx2torch,
weights written back into the ONNX initializers they came from (matched by value before training).

ADMM L0 sparse training (the ADMM + GA pruning patent, "an efficient pruning method for deep CNNs", CN 2021; three
sub-problems, k = 1, 2, ...), on per-channel scaling factors gamma (the
BatchNorm weights):
    1) gamma^k = argmin_gamma  loss(W, gamma) + rho/2 |gamma - z^{k-1} + u^{k-1}|^2     (SGD epochs)
    2) z^k     = argmin_z  lam |z|_0 + rho/2 |gamma^k + u^{k-1} - z|^2
               = v * [v^2 > 2 lam / rho],  v = gamma^k + u^{k-1}                          (hard threshold)
    3) u^k     = u^{k-1} + gamma^k - z^k
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def onnx_to_torch(model: onnx.ModelProto):
    """(module, {param_name: (initializer name, transposed)}) matching parameters to initializers by value."""
    from onnx2torch import convert

    tm = convert(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1}
    by_shape: dict[tuple, list[str]] = {}
    for n, a in inits.items():
        by_shape.setdefault(tuple(a.shape), []).append(n)
    mapping = {}
    used = set()
    for pname, p in tm.named_parameters():
        v = p.detach().cpu().numpy()
        for cand, tr in ((by_shape.get(tuple(v.shape), []), False), (by_shape.get(tuple(v.T.shape), []) if v.ndim == 2 else [], True)):
            hit = next((n for n in cand if n not in used and np.array_equal(inits[n], v.T if tr else v)), None)
            if hit:
                mapping[pname] = (hit, tr)
                used.add(hit)
                break
    return tm, mapping


def write_back(model: onnx.ModelProto, tm, mapping) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    params = dict(tm.named_parameters())
    idx = {t.name: i for i, t in enumerate(out.graph.initializer)}
    for pname, (iname, tr) in mapping.items():
        v = params[pname].detach().cpu().numpy().astype(np.float32)
        out.graph.initializer[idx[iname]].CopyFrom(numpy_helper.from_array(v.T.copy() if tr else v, iname))
    return out


def _feeds_list(ctx, n):
    out = []
    for i, f in enumerate(ctx.calib_batches()):
        if i >= n:
            break
        out.append(f)
    return out


def taylor_scores(model: onnx.ModelProto, groups, ctx, *, samples: int = 32, temperature: float = 0.5
                  ) -> dict[int, np.ndarray]:
    """{gid: E|<W_c, dL/dW_c> + b_c dL/db_c|} summed over the group's Conv/Gemm producers."""
    import torch
    import torch.nn.functional as F

    tm, mapping = onnx_to_torch(model)
    tm.eval()
    inv = {iname: pname for pname, (iname, tr) in mapping.items()}
    params = dict(tm.named_parameters())
    nodes = {n.name: n for n in model.graph.node}
    plan = {}
    for g in groups:
        items = []
        for r in g.producers:
            n = nodes.get(r.node)
            if n is None or n.op_type not in ("Conv", "Gemm") or len(n.input) < 2 or n.input[1] not in inv:
                continue
            wname = inv[n.input[1]]
            bname = inv.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            tr = mapping[wname][1]
            items.append((wname, bname, r.offset, tr))
        if items:
            plan[g.id] = items
    feeds = _feeds_list(ctx, samples)
    in_names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    labels = ctx.calib_labels
    acc = {gid: np.zeros(groups_by_size(groups)[gid]) for gid in plan}
    for k, f in enumerate(feeds):
        xs = [torch.from_numpy(np.asarray(f[nm])) for nm in in_names]
        tm.zero_grad()
        out = tm(*xs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        logits = out.reshape(out.shape[0], -1)
        if labels is not None and k < len(labels):
            loss = F.cross_entropy(logits, torch.as_tensor([int(labels[k])]).expand(logits.shape[0]))
        else:
            with torch.no_grad():
                tgt = F.softmax(logits.detach() / temperature, dim=1)
            loss = -(tgt * F.log_softmax(logits, dim=1)).sum(1).mean()
        loss.backward()
        for gid, items in plan.items():
            size = len(acc[gid])
            s = np.zeros(size)
            for wname, bname, off, tr in items:
                W, gW = params[wname], params[wname].grad
                if gW is None:
                    continue
                Wd = (W.detach() * gW)
                Wd = Wd.T if tr else Wd
                v = Wd.reshape(Wd.shape[0], -1).sum(1).numpy()
                if bname is not None and params[bname].grad is not None:
                    v = v + (params[bname].detach() * params[bname].grad).numpy()
                if off + size <= len(v):
                    s += v[off:off + size]
            acc[gid] += np.abs(s)
    return {gid: a / max(len(feeds), 1) for gid, a in acc.items()}


def groups_by_size(groups):
    return {g.id: g.size for g in groups}


# ----------------------------------------------------------------------------- fine-tuning with distillation
def _batches(x, y, batch, rng):
    perm = rng.permutation(len(x))
    for i in range(0, len(x), batch):
        b = perm[i:i + batch]
        yield x[b], (None if y is None else y[b])


def kd_finetune(student, teacher, x: np.ndarray, y: np.ndarray | None, *, epochs: int, lr: float = 1e-3,
                temperature: float = 4.0, alpha: float = 0.5, batch: int = 64, seed: int = 0):
    """L = alpha CE(s, y) + (1 - alpha) T^2 KL(softmax(t/T) || softmax(s/T)) (alpha = 0 without labels)."""
    import torch
    import torch.nn.functional as F

    dev = _device()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    student.to(dev).train()
    if teacher is not None:
        teacher.to(dev).eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    steps = max(1, epochs * ((len(x) + batch - 1) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    a = alpha if y is not None else 0.0
    for _ in range(epochs):
        for xb, yb in _batches(x, y, batch, rng):
            xb = torch.from_numpy(np.ascontiguousarray(xb)).to(dev)
            s = student(xb)
            loss = 0.0
            if a > 0:
                loss = loss + a * F.cross_entropy(s, torch.from_numpy(yb).to(dev))
            if teacher is not None and a < 1:
                with torch.no_grad():
                    t = teacher(xb)
                kl = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
                loss = loss + (1 - a) * temperature ** 2 * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    student.eval().cpu()
    return student


def finetune_onnx(pruned: onnx.ModelProto, original: onnx.ModelProto, ctx, *, epochs: int, lr: float = 1e-3
                  ) -> tuple[onnx.ModelProto, dict]:
    """KD fine-tune of the pruned ONNX model on ctx.train_data = (x, y|None) (or the calibration inputs)."""
    from edgec.core.errors import EdgecError

    data = ctx.train_data
    if data is None:
        feeds = _feeds_list(ctx, 10 ** 9)
        if not feeds:
            raise EdgecError("finetune_epochs needs training data (ctx.train_data) or calibration inputs")
        x = np.concatenate([list(f.values())[0] for f in feeds], 0)
        y = None
    else:
        x, y = data
        x = np.asarray(x, np.float32)
        y = None if y is None else np.asarray(y, np.int64)
    student, mapping = onnx_to_torch(pruned)
    teacher = ctx.torch_model
    if teacher is None:
        teacher, _ = onnx_to_torch(original)
    for p in teacher.parameters():
        p.requires_grad_(False)
    batch = 64
    try:
        import torch

        with torch.no_grad():
            student(torch.from_numpy(x[:2]))
            teacher(torch.from_numpy(x[:2]))
    except Exception:  # graphs exported with a fixed batch of 1
        batch = 1
    kd_finetune(student, teacher, x, y, epochs=epochs, lr=lr, batch=batch, seed=ctx.seed)
    out = write_back(pruned, student, mapping)
    return out, {"epochs": epochs, "samples": int(len(x)), "labels": y is not None, "batch": batch,
                 "parameters_written": len(mapping)}


# ----------------------------------------------------------------------------- distillation recovery (no labels)
def _kd_loss(s_outs, t_outs, temperature: float):
    """Sum over outputs: T^2 KL(softmax(t/T) || softmax(s/T)) for classifier-shaped ([N, C], C >= 2) outputs,
    |s - t|^2 / |t|^2 (mean over the batch) for the others."""
    import torch.nn.functional as F

    loss = 0.0
    for s, t in zip(s_outs, t_outs):
        if s.dim() == 2 and s.shape[1] >= 2:
            loss = loss + temperature ** 2 * F.kl_div(F.log_softmax(s / temperature, 1),
                                                      F.softmax(t / temperature, 1), reduction="batchmean")
        else:
            loss = loss + ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
    return loss


def distill_onnx(student: onnx.ModelProto, teacher: onnx.ModelProto, feeds: list[dict], *, steps: int = 200,
                 batch: int = 8, lr: float = 1e-4, temperature: float = 2.0, flip: bool = True, seed: int = 0,
                 threads: int = 1, progress=None, optimizer: str = "adam") -> tuple[onnx.ModelProto, dict]:
    """Distillation fine-tuning of `student` (a pruned ONNX model, converted with onnx2torch) toward `teacher` on
    unlabeled `feeds` (the fit split): `steps` Adam steps (cosine-decayed lr) of `batch` samples drawn with
    replacement from the feeds (seeded), each image input mirrored left-right with probability 1/2 when `flip`;
    one forward per batch when the graph allows a batch dimension, else per sample with accumulated gradients.
    The teacher is converted too and run on the same (mirrored) inputs. Loss: _kd_loss. Weights are written back into the
    initializers they came from (onnx_to_torch's mapping). CUDA when present, else CPU at `threads` threads.
    Returns (model, stats)."""
    import time

    import torch

    t0 = time.perf_counter()
    dev = _device()
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 4242])
    tm, mapping = onnx_to_torch(student)
    tm.to(dev).train()
    inits = {t.name for t in teacher.graph.initializer}
    names = [i.name for i in teacher.graph.input if i.name not in inits]
    teach, _ = onnx_to_torch(teacher)
    teach.to(dev).eval()
    for p in teach.parameters():
        p.requires_grad_(False)

    def run(mod, xs):
        out = mod(*[torch.from_numpy(xs[k]).to(dev) for k in names])
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def draw(n):
        xs = []
        for _ in range(n):
            f = feeds[int(rng.integers(len(feeds)))]
            mirror = flip and rng.random() < 0.5
            xs.append({k: (np.ascontiguousarray(np.asarray(v)[..., ::-1]) if mirror and np.asarray(v).ndim == 4
                           else np.asarray(v)) for k, v in f.items() if k in names})
        return xs

    batched = True  # one forward over the whole batch when the exported graph allows it, else per sample
    try:
        with torch.no_grad():
            two = {k: np.concatenate([x[k] for x in draw(2)]) for k in names}
            batched = run(tm, two)[0].shape[0] == 2 and run(teach, two)[0].shape[0] == 2
    except Exception:  # graphs exported with a fixed batch of 1 (Reshape to 1 x ...)
        batched = False
    params = [p for p in tm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else \
        torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    losses = []
    for step in range(steps):
        opt.zero_grad()
        xs = draw(batch)
        chunks = [{k: np.concatenate([x[k] for x in xs]) for k in names}] if batched else xs
        total = 0.0
        for xb in chunks:
            with torch.no_grad():
                t_outs = run(teach, xb)
            loss = _kd_loss(run(tm, xb), t_outs, temperature) / len(chunks)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        sched.step()
        losses.append(total)
        if progress:
            progress(f"distill step {step + 1}/{steps}: loss {total:.5f}")
    tm.eval().cpu()
    out = write_back(student, tm, mapping)
    k = max(1, steps // 10)
    return out, {"steps": steps, "batch": batch, "lr": lr, "optimizer": optimizer, "temperature": temperature, "samples": len(feeds),
                 "device": str(dev), "batched": batched, "loss_first": round(float(np.mean(losses[:k])), 6) if losses else None,
                 "loss_last": round(float(np.mean(losses[-k:])), 6) if losses else None,
                 "parameters_written": len(mapping), "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- ADMM L0 sparse training
def scaling_factors(model):
    """The per-channel scaling factors gamma: every BatchNorm weight."""
    import torch.nn as nn

    return [m.weight for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine]


def admm_sparse_train(model, x: np.ndarray, y: np.ndarray, *, iterations: int = 4, epochs_per_iter: int = 1,
                      lam: float = 1e-3, rho: float = 1e-2, lr: float = 1e-3, gamma_lr: float = 2e-2,
                      polish_epochs: int = 1, batch: int = 64, seed: int = 0) -> dict:
    """Seed-003 ADMM: alternate the three sub-problems; then project gamma onto the support of z (gamma = 0 where
    z = 0) and polish the other weights for `polish_epochs` with that mask held. Returns the zero fraction."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gammas = scaling_factors(model)
    z = [g.detach().clone() for g in gammas]
    u = [torch.zeros_like(g) for g in gammas]
    gid = {id(g) for g in gammas}
    rest = [p for p in model.parameters() if id(p) not in gid]
    opt = torch.optim.Adam([{"params": rest, "lr": lr}, {"params": gammas, "lr": gamma_lr}])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    history = []
    for it in range(iterations):
        model.train()
        for _ in range(epochs_per_iter):  # sub-problem 1: loss + rho/2 |gamma - z + u|^2
            for xb, yb in _batches(xt, yt, batch, rng):
                loss = F.cross_entropy(model(xb), yb)
                pen = sum(((g - zi + ui) ** 2).sum() for g, zi, ui in zip(gammas, z, u))
                opt.zero_grad()
                (loss + 0.5 * rho * pen).backward()
                opt.step()
        with torch.no_grad():
            thr = 2.0 * lam / rho
            for k, g in enumerate(gammas):  # sub-problem 2: hard threshold
                v = g + u[k]
                z[k] = torch.where(v * v > thr, v, torch.zeros_like(v))
            for k, g in enumerate(gammas):  # sub-problem 3: dual update
                u[k] = u[k] + g - z[k]
        zero = float(sum((zi == 0).sum().item() for zi in z) / max(sum(zi.numel() for zi in z), 1))
        history.append({"iteration": it, "zero_fraction": zero, "loss": round(float(loss.detach()), 4)})
    masks = [(zi != 0).to(g.dtype) for g, zi in zip(gammas, z)]
    with torch.no_grad():  # project: channels whose z is 0 get gamma = 0 (beta unchanged: a constant channel)
        for g, mk in zip(gammas, masks):
            g.mul_(mk)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(polish_epochs):  # masked polish: the support of z is fixed
        for xb, yb in _batches(xt, yt, batch, rng):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for g, mk in zip(gammas, masks):
                    g.mul_(mk)
    model.eval()
    return {"history": history, "zero_fraction": history[-1]["zero_fraction"] if history else 0.0}
