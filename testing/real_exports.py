"""Exports made by exporters edgec does not write: torch.onnx (TorchScript `dynamo=False` and dynamo), onnxslim,
onnxruntime's quantize_dynamic / quantize_static, timm and torchvision architectures (random weights, seeded).

Every export is cached under `cache_dir()` (EDGEC_EXPORT_CACHE, default .cache/real_exports, git-ignored), keyed by its
recipe and the torch / onnx versions, written atomically and regenerated when missing. Tests use the small ones
(`small=True` entries of CORPUS, tens of KB to a few MB, 64 px); the bench uses the whole corpus at 224 px.

An entry is a `RealExport`: how to compile it (--input-shape, --data, --input-value) and what produced it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEC_EXPORT_CACHE", ".cache/real_exports"))


@dataclass
class RealExport:
    name: str
    exporter: str                                   # who wrote the file, e.g. "torch.onnx TorchScript opset 13"
    path: Path
    input_shapes: dict[str, tuple[int, ...]]
    data: str | None = None                         # --data
    values: dict[str, str] = field(default_factory=dict)  # --input-value
    kind: str = "classifier"                        # classifier | dense | token | control
    traits: tuple[str, ...] = ()

    @property
    def shape_args(self) -> list[str]:
        return [f"{k}:{'x'.join(map(str, v))}" for k, v in self.input_shapes.items() if v]

    def cli_args(self) -> list[str]:
        args = []
        for s in self.shape_args:
            args += ["--input-shape", s]
        if self.data:
            args += ["--data", self.data]
        for k, v in self.values.items():
            args += ["--input-value", f"{k}={v}"]
        return args


def _versions() -> str:
    import onnx
    import torch

    return f"torch{torch.__version__}-onnx{onnx.__version__}"


def _cached(key: str, build: Callable[[Path], None], filename: str = "model.onnx") -> Path:
    """cache_dir()/<key>-<hash>/model.onnx, built by build(tmpdir) into a temp dir and renamed into place."""
    h = hashlib.sha256((key + _versions()).encode()).hexdigest()[:10]
    final = cache_dir() / f"{key}-{h}"
    if (final / filename).is_file():
        return final / filename
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}-"))
    try:
        build(tmp)
        with contextlib.suppress(OSError):
            os.replace(tmp, final)  # another process may have won the race: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / filename


def _torch_export(module, args: tuple, path: Path, *, dynamo: bool, opset: int, input_names, output_names,
                  dynamic_axes=None) -> None:
    import torch

    module.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            onnx_program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                             output_names=output_names, external_data=False, verbose=False)
            onnx_program.save(str(path))
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)


def _slim(path: Path) -> None:
    import onnx
    import onnxslim

    m = onnxslim.slim(onnx.load(str(path)))
    onnx.save(m, str(path))


def _arch(name: str, seed: int):
    import torch

    torch.manual_seed(seed)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=100)
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=100)


def vision_export(arch: str, *, dynamo: bool = False, opset: int = 17, slim: bool = False, hw: int = 224,
                  external: bool = False, seed: int = 0) -> RealExport:
    """A torchvision / timm architecture (random weights, BN statistics randomised so folding is not trivial)."""
    import torch

    tag = "dynamo" if dynamo else "ts"
    key = f"{arch.replace(':', '_')}-{tag}{opset}-{hw}{'-slim' if slim else ''}{'-ext' if external else ''}-s{seed}"

    def build(d: Path):
        m = _arch(arch, seed).eval()
        g = torch.Generator().manual_seed(seed + 1)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 0.5 + 0.75)
        x = torch.randn(1, 3, hw, hw, generator=g)
        p = d / "model.onnx"
        _torch_export(m, (x,), p, dynamo=dynamo, opset=opset, input_names=["images"], output_names=["logits"],
                      dynamic_axes=None if dynamo else {"images": {0: "batch"}, "logits": {0: "batch"}})
        if slim:
            _slim(p)
        if external:
            import onnx

            mp = onnx.load(str(p))
            onnx.save_model(mp, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)

    path = _cached(key, build)
    how = (f"torch.onnx {'dynamo' if dynamo else 'TorchScript'} opset {opset}" + (" + onnxslim" if slim else "")
           + (", external data" if external else ""))
    src = "timm" if arch.startswith("timm:") else "torchvision"
    return RealExport(f"{arch.split(':')[-1]}-{tag}{opset}{'-slim' if slim else ''}{'-ext' if external else ''}-{hw}",
                      f"{src} {arch.split(':')[-1]}, {how}", path, {"images": (1, 3, hw, hw)}, kind="classifier",
                      traits=("external_data",) if external else ())


class _TokenModel:
    """A small BERT-like encoder: token + position embeddings, nn.TransformerEncoder with a padding mask from
    attention_mask, mean-pooled classifier head. Two int64 inputs: input_ids, attention_mask."""

    @staticmethod
    def make(vocab=1000, d=64, heads=4, layers=2, classes=8):
        import torch
        from torch import nn

        class Tok(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(vocab, d)
                self.pos = nn.Parameter(torch.randn(1, 64, d) * 0.02)
                layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
                self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
                self.head = nn.Linear(d, classes)

            def forward(self, input_ids, attention_mask):
                x = self.emb(input_ids) + self.pos[:, : input_ids.shape[1]]
                pad = attention_mask == 0
                bias = pad.to(x.dtype)[:, None, None, :] * -1e4
                for lyr in self.enc.layers:  # explicit loop: a float mask exports through both exporters
                    x = lyr(x, src_mask=bias.expand(-1, heads, input_ids.shape[1], -1).reshape(-1, input_ids.shape[1], input_ids.shape[1]))
                m = attention_mask.to(x.dtype)[..., None]
                return self.head((x * m).sum(1) / m.sum(1).clamp(min=1.0))

        return Tok()


def token_export(*, seq: int = 16, dynamo: bool = False, opset: int = 17, seed: int = 0, n: int = 384) -> RealExport:
    """A 2-layer TransformerEncoder classifier over (input_ids, attention_mask), random weights, with `n` token
    samples in data.npz (enough for 64 validate and 128 eval samples: a 6-sample validate split decides nothing)."""
    import torch

    key = f"token-{'dynamo' if dynamo else 'ts'}{opset}-{seq}-n{n}-s{seed}"

    def build(d: Path):
        torch.manual_seed(seed)
        m = _TokenModel.make().eval()
        ids = torch.randint(0, 1000, (1, seq))
        mask = torch.ones(1, seq, dtype=torch.int64)
        _torch_export(m, (ids, mask), d / "model.onnx", dynamo=dynamo, opset=opset,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"])
        rng = np.random.default_rng(seed)
        ids_np = rng.integers(1, 1000, size=(n, seq)).astype(np.int64)
        lens = rng.integers(seq // 2, seq + 1, size=n)
        mask_np = (np.arange(seq)[None] < lens[:, None]).astype(np.int64)
        np.savez(d / "data.npz", input_ids=ids_np * mask_np, attention_mask=mask_np)

    path = _cached(key, build)
    return RealExport(f"token-{'dynamo' if dynamo else 'ts'}{opset}", f"torch.onnx {'dynamo' if dynamo else 'TorchScript'} "
                      f"opset {opset}, nn.TransformerEncoder token model", path,
                      {"input_ids": (1, seq), "attention_mask": (1, seq)}, data=str(path.parent / "data.npz"),
                      kind="token", traits=("multi_input", "int64_inputs"))


def control_export(*, opset: int = 17, seed: int = 0, n: int = 1600) -> RealExport:
    """A streaming-audio-like model scripted with torch.jit.script and exported by the TorchScript exporter:
    a float waveform, a float state, and a scalar int64 sample rate that selects a branch (ONNX If with Conv
    layers in both branches)."""
    import torch
    from torch import nn

    key = f"control-ts{opset}-{n}-s{seed}"

    class Stream(nn.Module):
        def __init__(self):
            super().__init__()
            self.stft16 = nn.Conv1d(1, 16, 64, stride=32)
            self.stft8 = nn.Conv1d(1, 16, 32, stride=16)
            self.mix = nn.Conv1d(16, 16, 3, padding=1)
            self.state = nn.Linear(16, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, wave: torch.Tensor, state: torch.Tensor, sr: torch.Tensor):
            if bool(sr == 16000):
                f = self.stft16(wave)
            else:
                f = self.stft8(wave[:, :, ::2])
            f = torch.relu(self.mix(torch.relu(f)))
            h = torch.tanh(self.state(state) + f.mean(2))
            return self.out(h), h

    def build(d: Path):
        torch.manual_seed(seed)
        m = torch.jit.script(Stream().eval())
        wave, state, sr = torch.randn(1, 1, n), torch.zeros(1, 16), torch.tensor(16000)
        _torch_export(m, (wave, state, sr), d / "model.onnx", dynamo=False, opset=opset,
                      input_names=["wave", "state", "sr"], output_names=["logits", "state_out"])
        rng = np.random.default_rng(seed)
        np.savez(d / "data.npz", wave=rng.standard_normal((24, 1, n)).astype(np.float32),
                 state=(rng.standard_normal((24, 16)) * 0.5).astype(np.float32))

    path = _cached(key, build)
    return RealExport(f"control-ts{opset}", f"torch.jit.script + torch.onnx TorchScript opset {opset} (If on an int64 "
                      f"scalar)", path, {"wave": (1, 1, n), "state": (1, 16)}, data=str(path.parent / "data.npz"),
                      values={"sr": "16000"}, kind="control", traits=("multi_input", "scalar_control", "if"))


def ort_quantized_export(arch: str = "resnet18", *, hw: int = 64, seed: int = 0, mode: str = "dynamic") -> RealExport:
    """A torchvision export quantized by onnxruntime.quantization (dynamic: ConvInteger / MatMulInteger /
    DynamicQuantizeLinear; static: QDQ QuantizeLinear / DequantizeLinear) -- a model another tool quantized."""
    base = vision_export(arch, hw=hw, opset=13, seed=seed)
    key = f"{arch}-ortq-{mode}-{hw}-s{seed}"

    def build(d: Path):
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            logging.getLogger().disabled, old = True, logging.getLogger().disabled
            try:
                if mode == "dynamic":
                    quantize_dynamic(str(base.path), str(d / "model.onnx"), op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                                     weight_type=QuantType.QUInt8)
                else:
                    rng = np.random.default_rng(seed)

                    class Reader(CalibrationDataReader):
                        def __init__(self):
                            self.it = iter([{"images": rng.standard_normal((1, 3, hw, hw)).astype(np.float32)}
                                            for _ in range(4)])

                        def get_next(self):
                            return next(self.it, None)

                    quantize_static(str(base.path), str(d / "model.onnx"), Reader())
            finally:
                logging.getLogger().disabled = old

    path = _cached(key, build)
    return RealExport(f"{arch}-ort-{mode}-quantized-{hw}", f"torchvision {arch}, TorchScript opset 13, then onnxruntime "
                      f"quantize_{mode}", path, {"images": (1, 3, hw, hw)}, kind="classifier",
                      traits=("already_quantized",))


def deep_bn_export(*, depth: int = 60, width: int = 16, hw: int = 32, seed: int = 2) -> RealExport:
    """A deep plain CNN (Conv -> BatchNorm -> ReLU x depth) exported with BatchNorm kept (TorchScript, training mode
    PRESERVE, no constant folding) and wide BN statistics: folding its BatchNorms is correct yet drifts ~3e-4
    relative in fp32 -- the rounding a deep real network (a 100-layer detector) shows."""
    import torch
    from torch import nn

    key = f"deepbn-ts13-{depth}x{width}-{hw}-s{seed}"

    def build(d: Path):
        torch.manual_seed(seed)
        layers: list = [nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(depth):
            layers += [nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)]
        m = nn.Sequential(*layers).eval()
        g = torch.Generator().manual_seed(seed + 1)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(width, generator=g) * 0.5)
                mod.running_var.copy_(torch.rand(width, generator=g) * 2 + 0.05)
                mod.weight.data.copy_(torch.randn(width, generator=g) * 0.5 + 1.0)
            elif isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.randn(1, 3, hw, hw),), str(d / "model.onnx"), dynamo=False, opset_version=13,
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                              input_names=["x"], output_names=["y"])

    path = _cached(key, build)
    return RealExport(f"deepbn{depth}-ts13-{hw}", f"torch.onnx TorchScript opset 13, {depth} unfused BatchNorms",
                      path, {"x": (1, 3, hw, hw)}, data="synthetic", kind="dense", traits=("deep", "unfused_bn"))


def crnn_export(*, h: int = 32, w: int = 160, opset: int = 17, seed: int = 0) -> RealExport:
    """A CRNN text recognizer (VGG-style conv stack with BatchNorm, height collapsed, BiLSTM x2, per-step classifier)
    exported by the TorchScript exporter: the Transpose/Reshape around the LSTM and its fp32 recurrence are what a
    latency-driven int8 quantizer cannot speed up."""
    import torch
    from torch import nn

    key = f"crnn-ts{opset}-{h}x{w}-s{seed}"

    class CRNN(nn.Module):
        def __init__(self, classes=37):
            super().__init__()
            chans, layers, c = (32, 64, 128, 128, 256, 256), [], 3
            for i, o in enumerate(chans):
                layers += [nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
                if i in (0, 1, 3, 5):
                    layers.append(nn.MaxPool2d((2, 2) if i < 2 else (2, 1)))
                c = o
            self.cnn = nn.Sequential(*layers)
            self.rnn = nn.LSTM(c, 96, num_layers=2, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(192, classes)

        def forward(self, x):
            f = self.cnn(x).mean(2).permute(0, 2, 1)  # N, T, C
            return self.fc(self.rnn(f)[0])

    def build(d: Path):
        torch.manual_seed(seed)
        m = CRNN().eval()
        g = torch.Generator().manual_seed(seed + 1)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 0.5 + 0.75)
        _torch_export(m, (torch.randn(1, 3, h, w),), d / "model.onnx", dynamo=False, opset=opset,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {3: "width"}, "logits": {1: "T"}})

    path = _cached(key, build)
    return RealExport(f"crnn-ts{opset}-{h}x{w}", f"torch.onnx TorchScript opset {opset}, CRNN (conv + BiLSTM), dynamic width",
                      path, {"x": (1, 3, h, w)}, kind="dense", traits=("lstm", "dynamic_width"))


# name -> (factory, small): small ones are what tests use; the bench runs them all.
CORPUS: dict[str, tuple[Callable[[], RealExport], bool]] = {
    "resnet18-ts11-64": (lambda: vision_export("resnet18", opset=11, hw=64), True),
    "mobilenet_v3_small-ts13-slim-64": (lambda: vision_export("mobilenet_v3_small", opset=13, slim=True, hw=64), True),
    "resnet18-dynamo18-64": (lambda: vision_export("resnet18", dynamo=True, opset=18, hw=64), True),
    "token-ts17": (lambda: token_export(), True),
    "control-ts17": (lambda: control_export(), True),
    "resnet18-ort-dynamic-64": (lambda: ort_quantized_export("resnet18", hw=64), True),
    "deepbn60-ts13-32": (lambda: deep_bn_export(), True),
    # bench-sized (224 px)
    "resnet18-ts17-224": (lambda: vision_export("resnet18", opset=17, hw=224), False),
    "mobilenet_v2-ts12-224": (lambda: vision_export("mobilenet_v2", opset=12, hw=224), False),
    "timm-convnext_atto-ts17-224": (lambda: vision_export("timm:convnext_atto", opset=17), False),
    "timm-mobilenetv3_large_100-dynamo18-224": (lambda: vision_export("timm:mobilenetv3_large_100", dynamo=True, opset=18), False),
    "efficientnet_b0-dynamo18-slim-224": (lambda: vision_export("efficientnet_b0", dynamo=True, opset=18, slim=True), False),
    "regnet_y_400mf-ts21-224": (lambda: vision_export("regnet_y_400mf", opset=21, hw=224), False),
    "shufflenet_v2_x1_0-ts11-224": (lambda: vision_export("shufflenet_v2_x1_0", opset=11, hw=224), False),
    "squeezenet1_1-ts17-ext-224": (lambda: vision_export("squeezenet1_1", opset=17, external=True), False),
    "mobilenet_v3_large-ts15-slim-224": (lambda: vision_export("mobilenet_v3_large", opset=15, slim=True, hw=224), False),
    "resnet18-dynamo20-224": (lambda: vision_export("resnet18", dynamo=True, opset=20, hw=224), False),
    "timm-resnet18d-ts13-slim-224": (lambda: vision_export("timm:resnet18d", opset=13, slim=True), False),
    "resnet18-ort-static-224": (lambda: ort_quantized_export("resnet18", hw=224, mode="static"), False),
    "crnn-ts17-32x160": (lambda: crnn_export(), False),
}


def small_corpus() -> list[str]:
    return [k for k, (_, small) in CORPUS.items() if small]


def get(name: str) -> RealExport:
    return CORPUS[name][0]()
