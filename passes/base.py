"""Pass infrastructure: a pass maps (model, ctx, options) -> PassResult(model, modified, typed stats).

Two ways to write one, one contract (`Pass`): a class registered with `@register_pass_class` (Options as a frozen
dataclass, `exact` and `in_place` flags, `requires` / `ensures` checks, `call`), or a function registered with
`@register_pass(name, options=..., exact=...)`, which the registry wraps in `FunctionPass`. The runner runs both
through `run_pass` (requires -> a private copy when in place -> call -> ensures). Recipes are validated against
the Options fields, so an unknown key is an error before anything runs. `exact=True` declares that the pass must
not change the model's outputs (checked by the runner against its exact tolerance after every pass).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import onnx

from edgec.core.executor import IN_PROCESS
from edgec.core.progress import Progress, as_progress

log = logging.getLogger(__name__)


@runtime_checkable
class TargetProbe(Protocol):
    """What a target measures for the passes (PassContext.target_probe): every probe offers all of it.

    targets/ort_latency.OrtLatencyProbe measures in this process; pipeline/cluster.RemoteProbe forwards the same
    calls to a device on the cluster. Passes never ask a probe what it can do (no hasattr): a target without
    measurements gives no probe (None), and a pass falls back to counted costs.
    """

    unknown_shape: list  # names of layers whose latency could not be measured at a static shape

    def model_latency_ms(self, model: onnx.ModelProto, runs: int | None = None) -> float:
        """Median batch-1 latency of `model` on the target."""

    def compare_latency_ms(self, models: list[onnx.ModelProto], runs: int | None = None) -> list[float]:
        """Median latencies of `models`, timed interleaved in one run (ratios between them are what counts)."""

    def layer_latency_table(self, model: onnx.ModelProto, layers, bits) -> dict[str, dict[int, float]]:
        """{layer: {bits: ms}}: each layer's measured latency at each bitwidth."""

    def effective_precision(self, model: onnx.ModelProto) -> dict:
        """{layer: {"effective": "int8" | "fp32", ...}}: the precision the target's kernels really run."""

    def check_kernels(self, model: onnx.ModelProto, claimed_bits: dict[str, int]) -> dict:
        """Layers the pass claimed as low-bit that the target would run in float (and why)."""

    def close(self) -> None:
        """Free the device (a remote probe's actor); a local probe has nothing to free."""


# typed slot -> the stats key the report has always read for it
_SLOT_KEYS = {"floor": "floor", "region": "postprocess"}


@dataclass
class PassResult:
    """What a pass returns. Typed slots: `floor` (the fidelity floor's outcome, passes/floor.py), `region` (the
    decode / post-processing region left float, passes/regions.py), `plots` ({name: PNG path}; the pipeline copies
    each into the artifact), `extra` (everything else the report shows for this pass).

    `stats` is the serialized view the report reads (StageRecord.stats -> report.json): at construction the typed
    slots are written into it under the report's keys ("floor", "postprocess", "<name>_png", extra keys), and a
    function pass that fills `stats` directly has its slots lifted from those keys, so both views agree."""

    model: onnx.ModelProto
    modified: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    floor: dict[str, Any] | None = None
    region: dict[str, Any] | None = None
    plots: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        st = self.stats
        if self.floor is None and isinstance(st.get("floor"), dict):
            self.floor = st["floor"]
        if self.region is None and isinstance(st.get("postprocess"), dict):
            self.region = st["postprocess"]
        for k, v in st.items():
            if k.endswith("_png") and isinstance(v, str):
                self.plots.setdefault(k[:-4], v)
            elif k not in _SLOT_KEYS.values():
                self.extra.setdefault(k, v)
        for slot, key in _SLOT_KEYS.items():
            if getattr(self, slot) is not None:
                st[key] = getattr(self, slot)
        for name, path in self.plots.items():
            st[f"{name}_png"] = path
        for k, v in self.extra.items():
            st.setdefault(k, v)


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
    # numpy BLAS threads for the passes' own math: one count chosen from the machine, never from the executor's
    # worker count, because OpenBLAS rounds differently at different counts (core.executor, "Numeric threads")
    blas_threads: int | None = None
    progress: Progress = field(default_factory=Progress)
    latency_probe: Callable[[onnx.ModelProto], float] | None = None
    target_probe: TargetProbe | None = None  # the target's measurements; None: counted costs only
    input_shapes: dict[str, tuple[int, ...]] | None = None
    validate_batches: Callable[[], Iterator[dict[str, np.ndarray]]] | None = None
    validate_labels: np.ndarray | None = None
    validate_groups: np.ndarray | None = None  # source of each validate sample (calib.data.DataSplit.groups)
    fidelity: Any = None  # passes.floor.FloorSpec
    executor: Any = IN_PROCESS  # edgec.core.executor.Executor

    def __post_init__(self) -> None:
        self.progress = as_progress(self.progress)

    @property
    def task_threads(self) -> int:
        """ORT threads for one executor task: the compile's evaluation threads shared among the executor's workers
        (all of them in process), so N concurrent tasks never oversubscribe the cores."""
        return max(1, int(self.threads) // max(1, int(getattr(self.executor, "workers", 1) or 1)))

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator derived from the run seed and a per-use salt, so every random choice flows from --seed."""
        import zlib

        return np.random.default_rng([self.seed, zlib.crc32(salt.encode())])


@dataclass(frozen=True)
class NoOptions:
    pass


class Pass:
    """A pass: ONNX -> ONNX under declared options, exactness and in-place behaviour. Subclass it:

        @register_pass_class
        class DropIdentity(Pass):
            '''Identity nodes removed; each consumer reads the Identity's input (exact).'''
            name = "drop_identity"
            exact = True
            in_place = True

            @dataclass(frozen=True)
            class Options:
                keep_graph_outputs: bool = True

            def ensures(self, model):
                if any(n.op_type == "Identity" for n in model.graph.node): raise EdgecError("Identity left")

            def call(self, model, ctx, opts) -> PassResult: ...

    The contract (run_pass; the runner calls it for every step):
      requires(model, ctx): raise EdgecError (one line) when the pass cannot run on this model or context.
      call(model, ctx, opts) -> PassResult: the transform. in_place=False: it must not mutate `model` (it may return
          it unchanged). in_place=True: it may edit `model` and return it; run_pass hands it a private copy, so no
          pass copies defensively.
      ensures(model): raise EdgecError when the output breaks the pass's postcondition.
      exact: the outputs stay equal to the input's (the runner checks this after every pass).
    The docstring's first line states the pass's math or rule (`python -m pipeline passes` prints it).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    exact: ClassVar[bool] = False
    in_place: ClassVar[bool] = False

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        return None

    def ensures(self, model: onnx.ModelProto) -> None:
        return None

    def call(self, model: onnx.ModelProto, ctx: PassContext, opts: Any) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, ctx: PassContext, opts: Any) -> PassResult:
        return run_pass(self, model, ctx, opts)


class FunctionPass(Pass):
    """A `@register_pass` function seen through the Pass contract: no requires/ensures, not in place (a function
    pass copies what it edits itself)."""

    def __init__(self, fn: Callable[[onnx.ModelProto, PassContext, Any], PassResult], name: str, options: type,
                 exact: bool):
        self.fn, self.name, self.Options, self.exact = fn, name, options, exact

    def call(self, model: onnx.ModelProto, ctx: PassContext, opts: Any) -> PassResult:
        return self.fn(model, ctx, opts)


def run_pass(p: Pass, model: onnx.ModelProto, ctx: PassContext, opts: Any) -> PassResult:
    """requires -> (a private copy for an in-place pass) -> call -> ensures."""
    p.requires(model, ctx)
    if p.in_place:
        own = onnx.ModelProto()
        own.CopyFrom(model)
        model = own
    res = p.call(model, ctx, opts)
    if not isinstance(res, PassResult):
        raise TypeError(f"pass {p.name!r} returned {type(res).__name__}, not PassResult")
    p.ensures(res.model)
    return res


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable[[onnx.ModelProto, PassContext, Any], PassResult]  # the function, or the Pass instance (callable)
    options: type
    exact: bool
    doc: str
    impl: Pass | None = None  # the contract the runner runs (a FunctionPass adapter for function passes)
    in_place: bool = False

    def __post_init__(self) -> None:
        # a function pass's adapter follows `fn` (also through dataclasses.replace(spec, fn=...))
        if self.impl is None or (isinstance(self.impl, FunctionPass) and self.impl.fn is not self.fn):
            object.__setattr__(self, "impl", FunctionPass(self.fn, self.name, self.options, self.exact))


_REGISTRY: dict[str, PassSpec] = {}


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def register_pass(name: str, *, options: type = NoOptions, exact: bool = False):
    """Decorator registering `fn(model, ctx, opts) -> PassResult` under `name` (seen as a FunctionPass)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} registered twice")
        _REGISTRY[name] = PassSpec(name=name, fn=fn, options=options, exact=exact, doc=_first_line(fn.__doc__))
        return fn

    return deco


def register_pass_class(cls: type[Pass]) -> type[Pass]:
    """Class decorator registering a Pass subclass under `cls.name`; its Options must be a frozen dataclass and its
    docstring must state the rule."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise ValueError(f"{cls!r} is not a Pass subclass with a name")
    if cls.name in _REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    opts = cls.Options
    if not (dataclasses.is_dataclass(opts) and opts.__dataclass_params__.frozen):
        raise ValueError(f"pass {cls.name!r}: Options must be a frozen dataclass")
    if not _first_line(cls.__doc__):
        raise ValueError(f"pass {cls.name!r}: the docstring's first line must state the pass's rule")
    inst = cls()
    _REGISTRY[cls.name] = PassSpec(name=cls.name, fn=inst, options=opts, exact=cls.exact, doc=_first_line(cls.__doc__),
                                   impl=inst, in_place=cls.in_place)
    return cls


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
