"""Lint a bundle's trtexec.sh against trtexec 10.3's flag list and the build rules trtexec enforces.

* every `--flag` on a trtexec command line is one trtexec 10.3 knows (api/trtexec-10.3-flags.txt);
* no --shapes/--minShapes/--optShapes/--maxShapes when every input of the model is static (trtexec:
  "Static model does not take explicit shapes");
* never --stronglyTyped together with --useDLACore (trtexec sets FP16 for DLA; a strongly typed network
  rejects it).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import onnx

from edgec.testing.fake_tensorrt import trtexec_flags

SHAPE_FLAGS = ("--shapes", "--minShapes", "--optShapes", "--maxShapes")


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


def lint_trtexec(bundle_dir) -> list[str]:
    """Problems in bundle_dir/trtexec.sh (empty when clean); static-ness read from bundle_dir/model.onnx."""
    d = Path(bundle_dir)
    cmds = trtexec_commands((d / "trtexec.sh").read_text())
    problems = [] if cmds else ["no trtexec command lines found"]
    known = trtexec_flags()
    static = is_static(onnx.load(str(d / "model.onnx"), load_external_data=False))
    for args in cmds:
        flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
        problems += [f"unknown trtexec 10.3 flag {f}" for f in flags if f not in known]
        if static:
            problems += [f"{f} on a static model (trtexec refuses explicit shapes)" for f in flags if f in SHAPE_FLAGS]
        if "--stronglyTyped" in flags and "--useDLACore" in flags:
            problems.append("--stronglyTyped with --useDLACore (trtexec sets FP16 for DLA; strongly typed rejects it)")
    return problems
