"""Small real-label test models: sklearn digits upsampled to 32x32, a VGG-style and a ResNet-style net.

    xtr, ytr, xte, yte = make_digits_data(seed)      # float32 (N, 1, 32, 32) in [-1, 1], int64 labels
    net = vgg_net() / resnet_net()                   # torch.nn.Module, input (N, 1, 32, 32), 10 logits
    train(net, xtr, ytr, epochs, seed)               # Adam, CPU, seconds
    accuracy(net_or_onnx, xte, yte)                  # in [0, 1]; accepts an nn.Module or an onnx.ModelProto
"""
from __future__ import annotations

import numpy as np


def make_digits_data(seed: int = 0, test_fraction: float = 0.25):
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).numpy() * 2.0 - 1.0
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n_te = int(round(len(y) * test_fraction))
    te, tr = idx[:n_te], idx[n_te:]
    return (np.ascontiguousarray(x[tr]), y[tr], np.ascontiguousarray(x[te]), y[te])


def _cbr(i, o, stride=1):
    import torch.nn as nn

    return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


def vgg_net(width: int = 32, seed: int | None = 0):
    """conv-bn-relu x2 / pool / x2 / pool / x2 / GAP / fc: widths w, 2w, 4w. Initial weights from torch's
    generator seeded with `seed` (None: its current state)."""
    import torch
    import torch.nn as nn

    if seed is not None:
        torch.manual_seed(seed)

    w = width
    return nn.Sequential(*_cbr(1, w), *_cbr(w, w), nn.MaxPool2d(2),
                         *_cbr(w, 2 * w), *_cbr(2 * w, 2 * w), nn.MaxPool2d(2),
                         *_cbr(2 * w, 4 * w), *_cbr(4 * w, 4 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def resnet_net(width: int = 32, seed: int | None = 0):
    """Stem + three stages of one basic residual block each (projection shortcut when shapes change). Initial
    weights as in vgg_net."""
    import torch
    import torch.nn as nn

    if seed is not None:
        torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, i, o, stride):
            super().__init__()
            self.c1 = nn.Sequential(*_cbr(i, o, stride))
            self.c2 = nn.Sequential(nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o))
            self.sc = nn.Identity() if (i == o and stride == 1) else nn.Sequential(
                nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.c2(self.c1(x)) + self.sc(x))

    w = width
    return nn.Sequential(*_cbr(1, w), Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def train(model, x, y, epochs: int = 8, seed: int = 0, lr: float = 2e-3, batch: int = 64):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * ((len(x) + batch - 1) // batch)))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            b = torch.from_numpy(perm[i:i + batch])
            loss = F.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def accuracy(model, x, y) -> float:
    import onnx

    if isinstance(model, onnx.ModelProto):
        from edgec.core.onnx_io import ort_session

        sess = ort_session(model, optimize=False)
        name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        if isinstance(fixed, int) and fixed == 1:
            pred = np.array([sess.run(None, {name: x[i:i + 1]})[0].argmax() for i in range(len(x))])
        else:
            pred = sess.run(None, {name: x})[0].argmax(1)
        return float((pred == y).mean())
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())
