"""`make artifacts`: reproducible tarballs and manifests; failures reported and exit non-zero."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from onnx import TensorProto as T
from onnx import helper, numpy_helper, save_model

from edgec.pipeline import artifacts as A
from edgec.core.errors import EdgecError


def tiny_onnx(path: Path) -> Path:
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(r.standard_normal((5, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["output"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", T.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("output", T.FLOAT, [1, 5])], initializer=inits)
    save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def spec(model: Path, **extra) -> dict:
    return {"defaults": {"recipe": "default", "seed": 0, "calib_samples": 4, "eval_samples": 4},
            "models": [str(model)], "targets": ["ort", "jetson"], **extra}


def members(tar: Path) -> dict[str, tuple]:
    with tarfile.open(tar) as tf:
        return {m.name: (m.mtime, m.uid, m.gid, m.uname, m.mode, tf.extractfile(m).read() if m.isfile() else None)
                for m in tf.getmembers()}


@pytest.mark.slow
def test_two_builds_are_byte_identical(tmp_path):
    combos, _ = A.parse_spec(spec(tiny_onnx(tmp_path / "tiny.onnx")))
    assert [c.name for c in combos] == ["tiny-ort-default", "tiny-jetson-default"]
    first = A.build_all(combos, tmp_path / "a")
    second = A.build_all(combos, tmp_path / "b")
    assert all(o.ok for o in first + second), [o.error for o in first + second]
    for o1, o2 in zip(first, second):
        assert o1.manifest_sha256 == o2.manifest_sha256 and o1.model_sha256 == o2.model_sha256
        name = o1.combo.name
        assert (tmp_path / "a" / f"{name}.manifest.json").read_bytes() == (tmp_path / "b" / f"{name}.manifest.json").read_bytes()
        m1, m2 = members(tmp_path / "a" / o1.tarball), members(tmp_path / "b" / o2.tarball)
        assert list(m1) == sorted(m1) and set(m1) == set(m2)
        for entry, meta in m1.items():
            assert meta[:4] == (0, 0, 0, ""), entry
            if Path(entry).name not in A.MEASUREMENT_FILES:
                assert meta == m2[entry], entry
        man = json.loads((tmp_path / "a" / f"{name}.manifest.json").read_text())
        hashed = {Path(e).name for e, m in m1.items() if m[-1] is not None} - A.MEASUREMENT_FILES - {"manifest.json"}
        assert set(man["files"]) == hashed
    jetson = members(tmp_path / "a" / "tiny-jetson-default.tar.gz")
    assert {"tiny-jetson-default/bench.py", "tiny-jetson-default/build_engine.py",
            "tiny-jetson-default/reference_outputs.npz", "tiny-jetson-default/trtexec.sh"} <= set(jetson)
    assert jetson["tiny-jetson-default/bench.py"][4] == 0o755
    summary = json.loads((tmp_path / "a" / "artifacts.json").read_text())
    assert summary["failed"] == 0 and len(summary["artifacts"]) == 2


def test_deterministic_tar_ignores_file_times(tmp_path):
    import os

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_text("b")
    (src / "sub" / "a.sh").write_text("echo")
    h1 = A.deterministic_tar(src, tmp_path / "one.tar.gz", "x")
    os.utime(src / "b.txt", (1e9, 1e9))
    h2 = A.deterministic_tar(src, tmp_path / "two.tar.gz", "x")
    assert h1 == h2
    (src / "b.txt").write_text("changed")
    assert A.deterministic_tar(src, tmp_path / "three.tar.gz", "x") != h1


def test_failures_are_reported_and_exit_nonzero(tmp_path, capsys):
    good = tiny_onnx(tmp_path / "tiny.onnx")
    data = spec(good, builds=[{"model": str(tmp_path / "missing.onnx"), "target": "ort"}])
    data["targets"] = ["ort"]
    data["out"] = str(tmp_path / "out")
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    rc = A.main([str(tmp_path / "a.yaml"), "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "tiny-ort-default" in out and "missing-ort-default" in out and "FAILED" in out
    assert "1 of 2 built, 1 failed" in out and "does not exist" in out
    assert (tmp_path / "out" / "tiny-ort-default.tar.gz").is_file()
    assert not (tmp_path / "out" / "missing-ort-default.tar.gz").exists()


@pytest.mark.parametrize("data,msg", [
    ({"models": ["m"]}, "give both"),
    ({"models": ["m"], "targets": ["ort"], "colour": 1}, "unknown key"),
    ({"models": ["m"], "targets": ["ort"], "defaults": {"speed": 1}}, "unknown option"),
    ({"builds": [{"model": "m"}]}, "needs 'model' and 'target'"),
    ({}, "no combinations"),
    ({"models": ["a/m.onnx", "b/m.onnx"], "targets": ["ort"]}, "same name"),
])
def test_spec_errors(data, msg):
    with pytest.raises(EdgecError, match=msg):
        A.parse_spec(data)


def test_shipped_spec_parses():
    combos, out = A.load_spec(Path(__file__).resolve().parent.parent / "artifacts.yaml")
    assert {c.name for c in combos} == {"efficientnet_lite0-ort-default", "efficientnet_lite0-jetson-default",
                                        "resnet18-ort-default", "resnet18-jetson-default"}
    assert out == Path("out/artifacts")
