"""CI artifact builds: compile a list of models x targets (x recipes) from YAML, one tarball per combination.

    python -m pipeline.artifacts artifacts.yaml [--out DIR] [--only SUBSTRING] [--cluster SPEC]

Reproducibility: the same inputs give byte-identical model.onnx and manifest.json (no timestamps or host
paths in hashed content). Each tarball lists its entries in sorted order with mtime 0, uid/gid 0, empty
owner names and normalized modes (0644, or 0755 for scripts), and is gzipped with mtime 0 and no file name;
files that hold measurements (report.json, report.md: timings, seconds) travel in the tarball but are
outside the manifest's hashes. Beside each tarball, <name>.manifest.json is a copy of its manifest.
The run writes artifacts.json (per combination: status, tarball sha256, manifest and model sha256) and
prints a summary table; the exit status is non-zero when any combination failed.

On a cluster (--cluster / EDGEC_CLUSTER, see core.executor and docs/cluster.md) every combination is one Ray task:
the worker compiles into a private temporary directory and packs the same deterministic tarball, which comes back
with its manifest and is written here (and unpacked under build/ as the serial run leaves it); the outputs are
byte-identical to the serial run's. A worker lost on a combination is retried once; a second loss, or no worker
left to run it, is reported as that combination's failure (the build never waits forever), so the exit is non-zero.
Workers run in this directory when it exists on their host (the same checkout), so relative model paths and the
measurement cache (.cache/edgec) resolve as they do here.

YAML:
    out: out/artifacts            # optional
    defaults: {recipe: default, seed: 0, bench: false, calib_samples: 32, eval_samples: 64}
    models: [efficientnet_lite0, "torchvision:resnet18"]
    targets: [ort, jetson]
    recipes: [default]            # optional, else defaults.recipe
    builds:                       # optional explicit combinations, added after the product
      - {model: x.onnx, target: tensorrt, recipe: quant, extra: {...}}
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from edgec.core.errors import EdgecError
from edgec.core.executor import IN_PROCESS, Executor, make_executor

log = logging.getLogger(__name__)

_TOP = {"out", "defaults", "models", "targets", "recipes", "builds"}
_OPTS = {"recipe", "seed", "bench", "calib_samples", "eval_samples", "overrides", "input_shapes", "weights", "data",
         "threads", "memory", "dynamic_batch"}
MEASUREMENT_FILES = {"report.json", "report.md"}
EXEC_SUFFIXES = (".py", ".sh")


@dataclass(frozen=True)
class Combo:
    model: str
    target: str
    recipe: str
    options: tuple = ()       # sorted (key, value) pairs passed to CompileOptions

    @property
    def name(self) -> str:
        from edgec.pipeline.sources import slug

        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{slug(self.model)}-{self.target}-{Path(self.recipe).stem}")


@dataclass
class Outcome:
    combo: Combo
    ok: bool
    seconds: float
    error: str = ""
    tarball: str = ""
    tar_sha256: str = ""
    manifest_sha256: str = ""
    model_sha256: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.combo.name, "model": self.combo.model, "target": self.combo.target,
                "recipe": self.combo.recipe, "ok": self.ok, "error": self.error, "tarball": self.tarball,
                "tar_sha256": self.tar_sha256, "manifest_sha256": self.manifest_sha256,
                "model_sha256": self.model_sha256, "seconds": round(self.seconds, 2)}


# ----------------------------------------------------------------------------- spec

def load_spec(path: str | Path) -> tuple[list[Combo], Path | None]:
    """Parse the YAML into combinations (models x targets x recipes, then explicit builds)."""
    p = Path(path)
    if not p.is_file():
        raise EdgecError(f"artifact spec {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise EdgecError(f"{p.name} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_spec(data)


def _options(d: dict, where: str) -> dict:
    bad = sorted(set(d) - _OPTS)
    if bad:
        raise EdgecError(f"unknown option(s) {', '.join(bad)} in {where}; valid: {', '.join(sorted(_OPTS))}")
    return dict(d)


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def parse_spec(data: dict) -> tuple[list[Combo], Path | None]:
    if not isinstance(data, dict):
        raise EdgecError("an artifact spec is a mapping with models/targets or builds")
    bad = sorted(set(data) - _TOP)
    if bad:
        raise EdgecError(f"unknown key(s) {', '.join(bad)} in the artifact spec; valid: {', '.join(sorted(_TOP))}")
    defaults = _options(data.get("defaults") or {}, "defaults")
    recipe = defaults.pop("recipe", "default")
    models = data.get("models") or []
    targets = data.get("targets") or []
    recipes = data.get("recipes") or [recipe]
    for key, val in (("models", models), ("targets", targets), ("recipes", recipes)):
        if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
            raise EdgecError(f"'{key}' must be a list of strings")
    if bool(models) != bool(targets):
        raise EdgecError("give both 'models' and 'targets' (their product is built), or use 'builds'")
    combos = [Combo(m, t, r, _freeze(defaults)) for m in models for t in targets for r in recipes]
    for i, b in enumerate(data.get("builds") or []):
        if not isinstance(b, dict) or "model" not in b or "target" not in b:
            raise EdgecError(f"builds[{i}] needs 'model' and 'target'")
        opts = dict(defaults)
        opts.update(_options({k: v for k, v in b.items() if k not in ("model", "target", "recipe")}, f"builds[{i}]"))
        combos.append(Combo(str(b["model"]), str(b["target"]), str(b.get("recipe", recipe)), _freeze(opts)))
    if not combos:
        raise EdgecError("the artifact spec lists no combinations")
    names = [c.name for c in combos]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgecError(f"combinations with the same name: {', '.join(dup)}")
    out = data.get("out")
    return combos, (Path(out) if out else None)


# ----------------------------------------------------------------------------- compile (one call)

def compile_combo(combo: Combo, outdir: Path) -> dict:
    """The one call into the public compile API (pipeline.compile.compile_model)."""
    from edgec.pipeline.compile import CompileOptions, compile_model

    opts = dict(combo.options)
    for k in ("threads", "overrides", "input_shapes"):
        if k in opts:
            opts[k] = tuple(opts[k]) if k == "threads" else list(opts[k])
    opts.setdefault("bench", False)
    opts.setdefault("memory", False)
    _seed_everything(int(opts.get("seed", 0)))
    return compile_model(CompileOptions(model=combo.model, target=combo.target, recipe=combo.recipe, out=str(outdir),
                                        command=f"edgec artifacts {combo.name}", **opts))


def _seed_everything(seed: int) -> None:
    """Random-weight model sources draw from torch's global generator: seed it for reproducible artifacts."""
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


# ----------------------------------------------------------------------------- tarballs

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def deterministic_tar(src: Path, dest: Path, arcroot: str) -> str:
    """tar.gz of every regular file under src (sorted, fixed metadata); returns its sha256."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        paths = sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        dirs = sorted({p.parent for p in paths if p.parent != src})
        for d in [src, *dirs]:
            ti = tarfile.TarInfo(arcroot if d == src else f"{arcroot}/{d.relative_to(src).as_posix()}")
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            _fix(ti)
            tf.addfile(ti)
        for p in paths:
            data = p.read_bytes()
            ti = tarfile.TarInfo(f"{arcroot}/{p.relative_to(src).as_posix()}")
            ti.size = len(data)
            ti.mode = 0o755 if p.suffix in EXEC_SUFFIXES and p.name != "__init__.py" else 0o644
            _fix(ti)
            tf.addfile(ti, io.BytesIO(data))
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=6) as g:
        g.write(raw.getvalue())
    data = gz.getvalue()
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return _sha256(data)


def _fix(ti: tarfile.TarInfo) -> None:
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.pax_headers = {}


# ----------------------------------------------------------------------------- run

CompileFn = Callable[[Combo, Path], Any]


def build_one(combo: Combo, root: Path, compile_fn: CompileFn = compile_combo) -> Outcome:
    t0 = time.perf_counter()
    build_dir = root / "build" / combo.name
    try:
        compile_fn(combo, build_dir)
        man = build_dir / "manifest.json"
        model = build_dir / "model.onnx"
        if not man.is_file() or not model.is_file():
            raise EdgecError(f"compile wrote no {'manifest.json' if not man.is_file() else 'model.onnx'}")
        tar = root / f"{combo.name}.tar.gz"
        tar_sha = deterministic_tar(build_dir, tar, combo.name)
        (root / f"{combo.name}.manifest.json").write_bytes(man.read_bytes())
        return Outcome(combo, True, time.perf_counter() - t0, tarball=tar.name, tar_sha256=tar_sha,
                       manifest_sha256=_sha256(man.read_bytes()), model_sha256=_sha256(model.read_bytes()))
    except EdgecError as e:
        return Outcome(combo, False, time.perf_counter() - t0, error=str(e))
    except Exception as e:  # a bug in one combination must not hide the others
        log.debug("artifact %s failed", combo.name, exc_info=True)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Outcome(combo, False, time.perf_counter() - t0, error=f"internal error: {type(e).__name__}: {msg}")


def build_all(combos: list[Combo], root: Path, compile_fn: CompileFn = compile_combo,
              executor: Executor = IN_PROCESS) -> list[Outcome]:
    """Build every combination (serially in process, or one task per combination on a cluster executor)."""
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(executor, type(IN_PROCESS)):
        outcomes = []
        for i, c in enumerate(combos, 1):
            log.info("[%d/%d] %s", i, len(combos), c.name)
            outcomes.append(build_one(c, root, compile_fn))
    else:
        outcomes = _build_on(executor, combos, root, compile_fn)
    summary = {"artifacts": [o.as_dict() for o in outcomes], "failed": sum(not o.ok for o in outcomes)}
    (root / "artifacts.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return outcomes


@dataclass(frozen=True)
class _RemoteBuild:
    """One combination's task: the callable shipped to a cluster worker (picklable, no closures)."""

    compile_fn: Any
    cwd: str

    def __call__(self, combo: Combo) -> tuple[Outcome, bytes, bytes]:
        import os
        import tempfile

        here = os.getcwd()
        if os.path.isdir(self.cwd):
            os.chdir(self.cwd)
        try:
            with tempfile.TemporaryDirectory(prefix="edgec-artifact-") as tmp:
                o = build_one(combo, Path(tmp), self.compile_fn)
                if not o.ok:
                    return o, b"", b""
                return (o, (Path(tmp) / o.tarball).read_bytes(),
                        (Path(tmp) / f"{combo.name}.manifest.json").read_bytes())
        finally:
            os.chdir(here)


def _build_on(executor: Executor, combos: list[Combo], root: Path, compile_fn: CompileFn) -> list[Outcome]:
    log.info("building %d combination(s) on %s (%d worker slot(s))", len(combos), executor.name, executor.workers)
    res = executor.map(_RemoteBuild(compile_fn, str(Path.cwd())), combos, desc="artifacts", return_exceptions=True)
    outcomes = []
    for c, r in zip(combos, res):
        if isinstance(r, BaseException):  # the worker was lost twice, or none was left to run it
            msg = str(r).strip().splitlines()[0] if str(r).strip() else type(r).__name__
            outcomes.append(Outcome(c, False, 0.0, error=msg))
            continue
        o, tar_bytes, man_bytes = r
        if o.ok:
            if _sha256(tar_bytes) != o.tar_sha256:
                o = Outcome(c, False, o.seconds, error="the tarball was corrupted on its way back from the worker")
            else:
                _write_back(root, c, tar_bytes, man_bytes)
        outcomes.append(o)
        log.info("%s %s (%.1f s)", c.name, "ok" if o.ok else f"FAILED: {o.error}", o.seconds)
    return outcomes


def _write_back(root: Path, combo: Combo, tar_bytes: bytes, man_bytes: bytes) -> None:
    """The tarball and manifest beside it, and the build directory unpacked as the serial run leaves it."""
    import shutil

    tar = root / f"{combo.name}.tar.gz"
    tmp = tar.with_name(tar.name + ".tmp")
    tmp.write_bytes(tar_bytes)
    tmp.replace(tar)
    (root / f"{combo.name}.manifest.json").write_bytes(man_bytes)
    build = root / "build"
    shutil.rmtree(build / combo.name, ignore_errors=True)
    build.mkdir(exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tf:
        tf.extractall(build, filter="data")


def summary_table(outcomes: list[Outcome]) -> str:
    rows = [("artifact", "status", "seconds", "manifest sha256", "detail")]
    for o in outcomes:
        rows.append((o.combo.name, "ok" if o.ok else "FAILED", f"{o.seconds:.1f}",
                     o.manifest_sha256[:16] if o.ok else "-", o.tarball if o.ok else o.error[:120]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ok = sum(o.ok for o in outcomes)
    lines.append(f"{ok} of {len(outcomes)} built, {len(outcomes) - ok} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.artifacts", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", nargs="?", default="artifacts.yaml")
    ap.add_argument("--out", default=None, help="output directory (default: the spec's 'out', else out/artifacts)")
    ap.add_argument("--only", default=None, help="build only combinations whose name contains this")
    ap.add_argument("--cluster", default=None, metavar="SPEC",
                    help="build on a Ray cluster: auto | ray://HOST:PORT | HOST:PORT | local:N "
                         "(default: $EDGEC_CLUSTER, else serially here)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    try:
        combos, out = load_spec(a.spec)
        if a.only:
            combos = [c for c in combos if a.only in c.name]
            if not combos:
                raise EdgecError(f"no combination matches --only {a.only}")
        root = Path(a.out or out or "out/artifacts")
        executor = make_executor(a.cluster)
        try:
            outcomes = build_all(combos, root, executor=executor)
        finally:
            getattr(executor, "close", lambda: None)()
    except EdgecError as e:
        print(f"edgec artifacts: error: {e}", file=sys.stderr)
        return e.exit_code
    print(summary_table(outcomes))
    print(f"  artifacts: {root}/  (summary: {root}/artifacts.json)")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
