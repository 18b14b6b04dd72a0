"""The house's layering, checked by walking every module's imports (AST), and the torch-free ONNX path.

    core      <- imports nothing of edgec
    calib     <- core
    passes    <- core, calib (torchkit only lazily, inside a function: torch is optional)
    torchkit  <- core, calib, passes
    targets   <- core, calib, passes
    pipeline  <- anything
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "core": {"core"},
    "calib": {"core", "calib"},
    "passes": {"core", "calib", "passes"},
    "torchkit": {"core", "calib", "passes", "torchkit"},
    "targets": {"core", "calib", "passes", "targets"},
}
LAZY_ONLY = {"passes": {"torchkit"}}
TOPS = {"core", "calib", "passes", "torchkit", "targets", "pipeline", "testing", "recipes"}


def _edgec_imports(path: Path):
    """(layer imported, lineno, at module level?) for every edgec import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "edgec" and len(parts) > 1:
                yield parts[1], node.lineno, id(node) in top_level
            elif parts[0] in TOPS:  # a bare top-level import would load a second copy of the module
                yield "bare:" + parts[0], node.lineno, id(node) in top_level


def _modules(layer: str):
    return sorted(p for p in (ROOT / layer).rglob("*.py") if "bundle_templates" not in p.parts)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_never_reach_up(layer):
    bad = []
    for path in _modules(layer):
        for imported, line, module_level in _edgec_imports(path):
            rel = path.relative_to(ROOT)
            if imported.startswith("bare:"):
                bad.append(f"{rel}:{line} imports '{imported[5:]}' without the edgec. prefix")
            elif imported in LAZY_ONLY.get(layer, set()):
                if module_level:
                    bad.append(f"{rel}:{line} imports edgec.{imported} at module level (only lazily allowed)")
            elif imported not in ALLOWED[layer]:
                bad.append(f"{rel}:{line} imports edgec.{imported}")
    assert not bad, "\n".join(bad)


def test_walker_catches_an_upward_import(tmp_path):
    """The walker itself must be able to fail: a module importing edgec.pipeline is reported."""
    p = tmp_path / "m.py"
    p.write_text("from edgec.pipeline.compile import compile_model\nimport passes\n")
    found = list(_edgec_imports(p))
    assert ("pipeline", 1, True) in found and ("bare:passes", 2, True) in found


def test_no_top_level_packages_installed(tmp_path):
    """Outside the checkout only `edgec` is importable: no top-level pipeline/passes/targets/calib."""
    code = textwrap.dedent("""
        import importlib.util, json
        print(json.dumps({n: importlib.util.find_spec(n) is not None
                          for n in ("edgec", "pipeline", "passes", "targets", "calib", "core")}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    import json

    found = json.loads(out.stdout)
    assert found == {"edgec": True, "pipeline": False, "passes": False, "targets": False, "calib": False,
                     "core": False}


BLOCK_TORCH = textwrap.dedent("""
    import sys, importlib.abc
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "onnx2torch", "efficientnet_lite_pytorch"):
                raise ImportError(f"{name} is blocked: the ONNX-only install has no torch")
    sys.meta_path.insert(0, NoTorch())
    from edgec.pipeline.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cleanup", "quant"])
def test_onnx_compiles_without_torch(tmp_path, recipe):
    """An ONNX file compiles with cleanup and quant when torch cannot be imported at all."""
    from edgec.testing.realworld_models import write_external

    rw = write_external(tmp_path / "m")
    out = tmp_path / "out"
    args = ["compile", "--model", str(rw.path), "--recipe", recipe, "--out", str(out), "--no-bench", "--threads", "1",
            "-q", *(["--set", "quant.calib_samples=8"] if recipe == "quant" else [])]
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.onnx").exists() and (out / "report.json").exists()
