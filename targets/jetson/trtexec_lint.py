"""Lint trtexec command lines against trtexec 10.3's flag list and the build rules trtexec enforces.

* every `--flag` on a trtexec command line is one trtexec 10.3 knows (bundle_templates/trtexec-10.3-flags.txt,
  from samples/common/sampleOptions.cpp of TensorRT release/10.3);
* no --shapes/--minShapes/--optShapes/--maxShapes when every input of the model is static (trtexec:
  "Static model does not take explicit shapes");
* never --stronglyTyped together with --useDLACore (trtexec sets FP16 for DLA; a strongly typed network
  rejects it).
The bundle writer lints every trtexec.sh it writes (a failure is an edgec bug, never the user's).
"""
from __future__ import annotations

import re
import shlex
from functools import lru_cache
from pathlib import Path

import onnx

FLAGS_FILE = Path(__file__).resolve().parent / "bundle_templates" / "trtexec-10.3-flags.txt"
SHAPE_FLAGS = ("--shapes", "--minShapes", "--optShapes", "--maxShapes")


@lru_cache(maxsize=1)
def trtexec_flags() -> frozenset[str]:
    return frozenset(ln.strip() for ln in FLAGS_FILE.read_text().splitlines() if ln.strip())


def trtexec_commands(text: str) -> list[list[str]]:
    """The argument lists of every "$TRTEXEC" invocation (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    cmds = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith('"$TRTEXEC"'):
            cmds.append(shlex.split(line.replace('"$TRTEXEC"', "trtexec", 1))[1:])
    return cmds


def is_static(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    return all(d.HasField("dim_value") and d.dim_value > 0 for vi in model.graph.input if vi.name not in inits
               for d in vi.type.tensor_type.shape.dim)


def lint_text(text: str, static: bool) -> list[str]:
    """Problems in a trtexec.sh text (empty when clean)."""
    cmds = trtexec_commands(text)
    problems = [] if cmds else ["no trtexec command lines found"]
    known = trtexec_flags()
    for args in cmds:
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
        problems += [f"unknown trtexec 10.3 flag {f}" for f in flags if f not in known]
        if static:
            problems += [f"{f} on a static model (trtexec refuses explicit shapes)" for f in flags if f in SHAPE_FLAGS]
        if "--stronglyTyped" in flags and "--useDLACore" in flags:
            problems.append("--stronglyTyped with --useDLACore (trtexec sets FP16 for DLA; strongly typed rejects it)")
    return problems


def lint_bundle(bundle_dir) -> list[str]:
    """lint_text on bundle_dir/trtexec.sh, static-ness read from bundle_dir/model.onnx."""
    d = Path(bundle_dir)
    return lint_text((d / "trtexec.sh").read_text(), is_static(onnx.load(str(d / "model.onnx"), load_external_data=False)))
