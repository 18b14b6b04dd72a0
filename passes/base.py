"""Pass infrastructure: a pass is `run(model, ctx, options) -> PassResult(model, modified, stats)`.

A pass is registered with a frozen options dataclass; recipes are validated against those fields,
so an unknown key is an error before anything runs. `exact=True` declares that the pass must not
change the model's outputs (checked by the runner at 1e-4 relative).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from edgec.core.executor import IN_PROCESS
from edgec.core.progress import Progress, as_progress

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the model. Nothing here names a target.

    calib_batches: callable returning a fresh iterator of feeds {input_name: array}, one sample each (batch 1
        unless the model has a fixed larger batch). Streamed: never materialise all activations.
    calib_labels: optional int labels aligned with calib_batches (enables cross-entropy criteria).
    reference_model: the original FP32 model, for recovery targets and fidelity floors; the runner advances it to
        the output of the leading exact passes (normalize, cleanup: the same function within 1e-4, with the node
        names later passes see).
    torch_model: the source nn.Module when the model came from torch (None for ONNX inputs).
    quant_dialect: the target's quantization dialect (a passes.quant dialect object) or None.
    seed: the one seed every random choice flows from.
    cache_dir: where passes may cache measurements (sensitivities, latency tables).
    progress: the progress API (edgec.core.progress.Progress): `track(iterable, total=, desc=)` draws one bar per
        long loop, `step(desc)` wraps a long step, `detail(msg)` is -v detail, `progress(msg)` one INFO line. A plain
        `fn(msg)` given here is wrapped. Bars are silent in tests and under -q.
    latency_probe: optional callable(model) -> median ms at batch 1 on the target (for latency budgets).
    target_probe: optional object from the target offering measured costs (per-layer latency tables).
    input_shapes: the concrete compile shape {input: dims}; when the model keeps dynamic axes (--dynamic) its
        inputs stay symbolic, and passes count MACs / read spatial sizes at these shapes.
    validate_batches / validate_labels: the validate split (disjoint from calib_batches, the fit split): every
        fidelity decision (floors, bisections, promotions) is measured here, never on the samples a pass fitted to.
        None (library use): floors fall back to calib_batches and say so.
    fidelity: the recipe's fidelity policy (passes.floor.FloorSpec) that every lossy pass obeys; None: the pass's own
        floor options (library use).
    executor: the executor seam (edgec.core.executor) that evaluates many independent candidates: in process by
        default, a Ray cluster under --cluster. Results never depend on it.
    """

    calib_batches: Callable[[], Iterator[dict[str, np.ndarray]]]
    calib_labels: np.ndarray | None = None
    reference_model: onnx.ModelProto | None = None
    torch_model: Any = None
    train_data: Any = None
    quant_dialect: Any = None
    seed: int = 0
    cache_dir: str | None = None
    threads: int = 1
    progress: Progress = field(default_factory=Progress)
    latency_probe: Callable[[onnx.ModelProto], float] | None = None
    target_probe: Any = None  # target-provided measurements (e.g. per-layer latency tables); see targets/
    input_shapes: dict[str, tuple[int, ...]] | None = None
    validate_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
    validate_labels: np.ndarray | None = None
    fidelity: Any = None  # passes.floor.FloorSpec
    executor: Any = IN_PROCESS  # edgec.core.executor.Executor

    def __post_init__(self) -> None:
        self.progress = as_progress(self.progress)

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator derived from the run seed and a per-use salt, so every random choice flows from --seed."""
        import zlib

        return np.random.default_rng([self.seed, zlib.crc32(salt.encode())])


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable[[onnx.ModelProto, PassContext, Any], PassResult]
    options: type
    exact: bool
    doc: str


_REGISTRY: dict[str, PassSpec] = {}


def register_pass(name: str, *, options: type = NoOptions, exact: bool = False):
    """Decorator registering `fn(model, ctx, opts) -> PassResult` under `name`."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = PassSpec(name=name, fn=fn, options=options, exact=exact, doc=doc)
        return fn

    return deco


def _load_all() -> None:
    # Importing the modules registers their passes.
    import importlib
    import pkgutil

    import edgec.passes as pkg

    for mod in pkgutil.walk_packages(pkg.__path__, prefix="edgec.passes."):
        if mod.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(mod.name)


def get_pass(name: str) -> PassSpec:
    _load_all()
    if name not in _REGISTRY:
        from edgec.core.errors import EdgecError

        raise EdgecError(f"unknown pass '{name}'; known passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_passes() -> dict[str, PassSpec]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def make_options(spec: PassSpec, raw: dict[str, Any] | None) -> Any:
    """Build the pass's frozen options from a dict; unknown keys and bad types are errors."""
    from edgec.core.errors import EdgecError

    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise EdgecError(
            f"unknown option(s) {', '.join(unknown)} for pass '{spec.name}'; "
            f"valid: {', '.join(sorted(fields)) or '(none)'}"
        )
    try:
        return spec.options(**raw)
    except (TypeError, ValueError) as e:
        raise EdgecError(f"bad options for pass '{spec.name}': {e}") from None


def options_dict(opts: Any) -> dict[str, Any]:
    return dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else {}
