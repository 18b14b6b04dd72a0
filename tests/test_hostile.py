"""Hostile and broken input (issue 6, section 3): each gets one `edgec: error:` line, exit code 2, no traceback,
no output directory, and nothing outside the model's directory is ever opened."""
from __future__ import annotations

import errno
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgec.pipeline.cli import main
from edgec.core.errors import EdgecError
from edgec.pipeline.importer import load_onnx_file

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--no-bench", "--calib-samples", "2", "--eval-samples", "2", "-q", "--recipe", "cleanup"]

# ------------------------------------------------------------------------------------------ file-open auditing
_OPENED: list[str] = []
_AUDIT = {"on": False}


def _audit(event, args):
    if _AUDIT["on"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = args[0]
        _OPENED.append(os.fsdecode(p) if not isinstance(p, str) else p)


sys.addaudithook(_audit)


class OpenLog:
    """Records every path opened from Python (builtins.open, os.open, io) while active."""

    def __enter__(self):
        _OPENED.clear()
        _AUDIT["on"] = True
        return self

    def __exit__(self, *exc):
        _AUDIT["on"] = False

    def touched(self, target: Path) -> list[str]:
        real = os.path.realpath(target)
        return [p for p in _OPENED if os.path.realpath(p) == real]


# ------------------------------------------------------------------------------------------ helpers
def _conv_model(w=None, *, nodes=None, inits=None, opset=17, domains=()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) if w is None else w
    inits = [numpy_helper.from_array(w, "w")] if inits is None else inits
    nodes = nodes or [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                      helper.make_node("Relu", ["c"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)] +
                             [helper.make_opsetid(d, 1) for d in domains])


def _save(m: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())
    return path


def _user_files_read_outside_model_dir(argv, scope: Path) -> list[str]:
    """Paths opened under `scope` (the test's own area: model dir, secrets, outputs) other than the model's
    directory and the files named by --data / --weights. Library and interpreter files are not user data."""
    allowed_dirs, allowed = [], set()
    for flag, val in zip(argv, argv[1:]):
        if flag == "--model" and val.endswith(".onnx"):
            allowed_dirs.append(os.path.realpath(Path(val).parent))
        if flag in ("--data", "--weights"):
            allowed.add(os.path.realpath(val))
    scope_r = os.path.realpath(scope)
    bad = []
    for p in _OPENED:
        r = os.path.realpath(p)
        if not r.startswith(scope_r + os.sep) or r in allowed:
            continue
        if any(r == d or r.startswith(d + os.sep) for d in allowed_dirs):
            continue
        bad.append(r)
    return bad


def _refused(argv, capsys, out: Path, *patterns: str, code: int = 2) -> str:
    with OpenLog():
        rc = main(argv)
    assert not _user_files_read_outside_model_dir(argv, out.parent), _OPENED
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("edgec: error: "), err
    assert "Traceback" not in err
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])
    assert not out.exists(), "an output directory was left behind"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a partial directory was left behind"
    return lines[0]


def _compile(model: Path, out: Path, *extra) -> list[str]:
    return ["compile", "--model", str(model), "--out", str(out), *FAST, *extra]


# ------------------------------------------------------------------------------------------ protobuf
def test_truncated_protobuf(tmp_path, capsys):
    good = _conv_model().SerializeToString()
    p = tmp_path / "m" / "trunc.onnx"
    p.parent.mkdir()
    p.write_bytes(good[: len(good) // 2])  # cut inside the weight's raw_data
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"trunc\.onnx", r"corrupt or truncated")


@pytest.mark.parametrize("frac", [0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_truncated_anywhere_is_an_edgec_error(tmp_path, frac):
    good = _conv_model().SerializeToString()
    p = _save(onnx.ModelProto(), tmp_path / "t.onnx")
    p.write_bytes(good[: int(len(good) * frac)])
    with pytest.raises(EdgecError, match=r"t\.onnx"):
        load_onnx_file(p)


@pytest.mark.parametrize("payload", [b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"hello, this is not onnx\n" * 4,
                                     bytes(range(256)) * 3, b""])
def test_corrupt_protobuf(tmp_path, capsys, payload):
    p = tmp_path / "m" / "junk.onnx"
    p.parent.mkdir()
    p.write_bytes(payload)
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out",
             r"junk\.onnx (is empty|is not a valid ONNX protobuf|has no graph|has no ir_version)")


# ------------------------------------------------------------------------------------------ graph structure
def test_cycle(tmp_path, capsys):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Identity", ["a"], ["y"], name="out")]
    m = _conv_model(nodes=nodes, inits=[])
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3
    p = _save(m, tmp_path / "m" / "cycle.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"cycle", r"'add' \(Add\)", r"'relu' \(Relu\)")


def test_dangling_input(tmp_path, capsys):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Add", ["c", "ghost"], ["y"], name="add_ghost")]
    p = _save(_conv_model(nodes=nodes), tmp_path / "m" / "dangling.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"'add_ghost' \(Add\) reads 'ghost'", "dangling")


def test_dangling_output(tmp_path, capsys):
    m = _conv_model()
    m.graph.output.append(helper.make_tensor_value_info("nowhere", T.FLOAT, [1]))
    p = _save(m, tmp_path / "m" / "dout.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"graph output 'nowhere' is produced by no node")


def test_unsorted_but_acyclic_graph_is_sorted_and_compiles(tmp_path, capsys):
    m = _conv_model()
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    p = _save(m, tmp_path / "m" / "unsorted.onnx")
    loaded = load_onnx_file(p)
    assert [n.name for n in loaded.graph.node] == ["conv", "relu"]
    assert main(_compile(p, tmp_path / "out")) == 0, capsys.readouterr().err


def test_unknown_domain(tmp_path, capsys):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("FancyAct", ["c"], ["y"], name="fancy", domain="com.acme.custom")]
    p = _save(_conv_model(nodes=nodes, domains=("com.acme.custom",)), tmp_path / "m" / "custom.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out",
             r"'fancy' \(FancyAct\) uses op 'FancyAct' from unknown domain 'com.acme.custom'")


def test_unknown_op_in_default_domain(tmp_path, capsys):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Reluu", ["c"], ["y"], name="typo")]
    p = _save(_conv_model(nodes=nodes), tmp_path / "m" / "typo.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"'Reluu', which is not an ONNX operator")


# ------------------------------------------------------------------------------------------ tensors
def test_initializer_raw_size_disagrees_with_shape(tmp_path, capsys):
    m = _conv_model()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-8]  # 2 floats short
    p = _save(m, tmp_path / "m" / "short.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out",
             r"tensor 'w' has shape \[4, 3, 3, 3\] \(108 elements, 432 bytes\) but stores 424 bytes")


def test_initializer_typed_size_disagrees_with_shape(tmp_path, capsys):
    t = onnx.TensorProto(name="w", data_type=T.FLOAT, dims=[4, 3, 3, 3])
    t.float_data.extend([0.0] * 100)  # 100 values for 108 elements
    p = _save(_conv_model(inits=[t]), tmp_path / "m" / "typed.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"tensor 'w' .*108 elements\) but stores 100 values")


def test_initializer_claims_huge_shape(tmp_path, capsys):
    m = _conv_model()
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([4, 3, 3, 3, 1 << 40])
    p = _save(m, tmp_path / "m" / "huge.onnx")
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"tensor 'w' has shape .* but stores 432 bytes")


# ------------------------------------------------------------------------------------------ external data
def _external_model(model_dir: Path, location: str, nbytes: int = 432, offset: int = 0) -> Path:
    m = _conv_model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = T.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
        e = w.external_data.add()
        e.key, e.value = k, v
    return _save(m, model_dir / "model.onnx")


@pytest.fixture
def sentinel(tmp_path):
    """A secret file outside the model directory, large enough to satisfy any offset/length."""
    s = tmp_path / "secret" / "passwd"
    s.parent.mkdir()
    s.write_bytes(b"root:x:0:0:SECRET\n" * 64)
    return s


@pytest.mark.parametrize("kind", ["dotdot", "deep_dotdot", "absolute", "symlink", "backslash_dotdot"])
def test_external_data_escaping_model_dir_is_refused_and_never_read(tmp_path, capsys, sentinel, kind, monkeypatch):
    mdir = tmp_path / "models" / "m"
    mdir.mkdir(parents=True)
    loc = {"dotdot": "../../secret/passwd", "deep_dotdot": "sub/../../../secret/passwd", "absolute": str(sentinel),
           "symlink": "weights.bin", "backslash_dotdot": "..\\..\\secret\\passwd"}[kind]
    if kind == "symlink":
        (mdir / "weights.bin").symlink_to(sentinel)
    p = _external_model(mdir, loc)
    import onnx.external_data_helper as edh

    def _never(*a, **k):
        raise AssertionError("onnx's own external-data loader must not be used")

    monkeypatch.setattr(edh, "load_external_data_for_model", _never)
    monkeypatch.setattr(onnx, "load_external_data_for_model", _never, raising=False)
    before = sentinel.read_bytes()
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"model\.onnx: ",
             r"(refusing external data|does not exist)")
    assert OpenLog().touched(sentinel) == [], "a file outside the model directory was opened"
    assert sentinel.read_bytes() == before


def test_external_data_inside_dir_loads_and_compiles(tmp_path, capsys):
    mdir = tmp_path / "m"
    mdir.mkdir()
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    (mdir / "data").mkdir()
    (mdir / "data" / "w.bin").write_bytes(b"\0" * 16 + w.tobytes())
    p = _external_model(mdir, "data/w.bin", offset=16)
    with OpenLog() as log:
        m = load_onnx_file(p)
    assert np.array_equal(numpy_helper.to_array(m.graph.initializer[0]), w)
    assert all(os.path.realpath(x).startswith(os.path.realpath(mdir)) for x in _OPENED
               if x.endswith((".bin", ".onnx"))), _OPENED
    assert log.touched(mdir / "data" / "w.bin")
    assert main(_compile(p, tmp_path / "out")) == 0, capsys.readouterr().err


@pytest.mark.parametrize("case", ["too_short", "wrong_length", "missing", "fifo", "bad_offset"])
def test_external_data_bad_reference(tmp_path, capsys, case):
    mdir = tmp_path / "m"
    mdir.mkdir()
    loc, nbytes, offset, pattern = "w.bin", 432, 0, ""
    if case == "too_short":
        (mdir / "w.bin").write_bytes(b"\0" * 100)
        pattern = r"too short for tensor 'w'"
    elif case == "wrong_length":
        (mdir / "w.bin").write_bytes(b"\0" * 1000)
        nbytes, pattern = 400, r"tensor 'w' has shape \[4, 3, 3, 3\] \(432 bytes\) but its external data says"
    elif case == "missing":
        pattern = r"external data file 'w.bin' of tensor 'w' does not exist"
    elif case == "fifo":  # reading a FIFO would block forever
        os.mkfifo(mdir / "w.bin")
        pattern = r"is not a regular file"
    elif case == "bad_offset":
        (mdir / "w.bin").write_bytes(b"\0" * 1000)
        offset, pattern = -5, r"offset -5"
    p = _external_model(mdir, loc, nbytes=nbytes, offset=offset)
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", pattern)


def test_model_over_2gb_single_file_refused_before_reading(tmp_path, capsys):
    p = tmp_path / "m" / "big.onnx"
    p.parent.mkdir()
    with open(p, "wb") as f:  # sparse: 2.2 GB apparent size, no disk used
        f.truncate(2_200_000_000)
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", r"over protobuf's 2 GiB limit",
             r"external data")
    assert OpenLog().touched(p) == [], "the oversized file was opened"


def test_large_model_goes_through_external_data_path(tmp_path, capsys, monkeypatch):
    """With the threshold lowered: the checker only ever sees the model without its weights, the weights are read
    from the validated byte ranges, and compile succeeds."""
    import edgec.pipeline.importer as imp

    monkeypatch.setattr(imp, "LARGE_MODEL_BYTES", 100)
    mdir = tmp_path / "m"
    from edgec.testing import realworld_models as rw

    rec = rw.write_external(mdir)
    weights = (rec.path.parent / "model.onnx.data").stat().st_size
    seen = []
    real_check = onnx.checker.check_model

    def spy(model, *a, **k):
        if isinstance(model, onnx.ModelProto):
            seen.append(model.ByteSize())
        return real_check(model, *a, **k)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    m = load_onnx_file(rec.path)
    assert seen and max(seen) < weights, (seen, weights)
    assert all(t.data_location == T.DEFAULT and t.raw_data for t in m.graph.initializer)
    # ORT gets a path with external data instead of bytes once the model is over the (lowered) limit
    import onnxruntime as ort

    (tmp_path / "spill").mkdir()
    src = imp.ort_source(m, tmp_path / "spill", threshold=1000)
    assert isinstance(src, str) and (tmp_path / "spill" / "model.onnx.data").stat().st_size > weights // 2
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    a = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(imp.ort_source(m, tmp_path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.array_equal(a, b)
    assert main(_compile(rec.path, tmp_path / "out", "--input-shape", "input:1x3x32x32")) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ .pth files
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EDGEC_PWNED', '/tmp/edgec_pwned')}",))


@pytest.mark.parametrize("kind", ["pickle_payload", "whole_module", "not_a_dict", "garbage"])
def test_pth_not_a_plain_state_dict(tmp_path, capsys, kind, monkeypatch):
    import torch

    marker = tmp_path / "PWNED"
    monkeypatch.setenv("EDGEC_PWNED", str(marker))
    w = tmp_path / f"{kind}.pth"
    if kind == "pickle_payload":
        torch.save({"conv1.weight": torch.zeros(1), "evil": _Evil()}, w)
        pattern = r"refusing weights file pickle_payload\.pth: not a plain state dict"
    elif kind == "whole_module":
        torch.save(torch.nn.Linear(2, 2), w)
        pattern = r"refusing weights file whole_module\.pth|not a state dict of tensors"
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], w)
        pattern = r"not_a_dict\.pth is not a state dict of tensors"
    else:
        w.write_bytes(pickle.dumps("x")[:3] + b"\x00garbage")
        pattern = r"refusing weights file garbage\.pth"
    out = tmp_path / "out"
    _refused(["compile", "--model", "torchvision:resnet18", "--weights", str(w), "--out", str(out), *FAST],
             capsys, out, pattern)
    assert not marker.exists(), "the pickle payload was executed"


# ------------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_inf_in_weights(tmp_path, capsys, bad):
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1, 2, 0, 0] = np.nan if bad == "nan" else -np.inf
    p = _save(_conv_model(w), tmp_path / "m" / "nanw.onnx")
    pattern = r"weight 'w' contains 1 NaN" if bad == "nan" else r"weight 'w' \(used by Conv 'conv'\) contains 1 Inf"
    _refused(_compile(p, tmp_path / "out"), capsys, tmp_path / "out", pattern)


def test_inf_mask_constant_is_allowed():
    from edgec.pipeline.guards import check_finite_weights

    nodes = [helper.make_node("Less", ["x", "zero"], ["cond"]), helper.make_node("Where", ["cond", "neg_inf", "x"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [4])],
                          [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(-np.inf), "neg_inf")])
    check_finite_weights(helper.make_model(g))  # no error: -inf as a mask value is legitimate


def _npy_model(tmp_path) -> Path:
    return _save(_conv_model(), tmp_path / "m" / "cnn.onnx")


@pytest.mark.parametrize("case", ["nan", "inf", "shape", "rank", "dtype_complex", "dtype_bool", "dtype_str", "count_one",
                                  "labels_count", "empty_eval", "object_pickle"])
def test_bad_calibration_data(tmp_path, capsys, case):
    p = _npy_model(tmp_path)
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    d = tmp_path / "data.npy"
    pattern = {"nan": r"contains NaN or Inf", "inf": r"contains NaN or Inf", "shape": r"shape \(6, 3, 9, 8\).*needs \(N, 3, 8, 8\)",
               "rank": r"shape \(3, 8, 8\)", "dtype_complex": r"dtype complex64", "dtype_bool": r"dtype bool",
               "dtype_str": r"dtype <U1", "count_one": r"1 sample\(s\); need at least \d",
               "labels_count": r"\d+ (calib|fit|validate|eval) labels for \d+ samples", "empty_eval": r"the eval split is empty",
               "object_pickle": r"cannot read data file"}[case]
    if case == "nan":
        x[3, 1, 2, 2] = np.nan
    elif case == "inf":
        x[0, 0, 0, 0] = np.inf
    elif case == "shape":
        x = np.zeros((6, 3, 9, 8), np.float32)
    elif case == "rank":
        x = x[0]
    elif case == "dtype_complex":
        x = x.astype(np.complex64)
    elif case == "dtype_bool":
        x = x > 0
    elif case == "dtype_str":
        x = np.full((6, 3, 8, 8), "a")
    elif case == "count_one":
        x = x[:1]
    if case == "labels_count":
        d = tmp_path / "data.npz"
        np.savez(d, calib=x[:2], eval=x[2:4], calib_labels=np.arange(1))
    elif case == "empty_eval":
        d = tmp_path / "data.npz"
        np.savez(d, calib=x[:2], eval=x[:0])
    elif case == "object_pickle":
        np.save(d, np.array([x[0], "payload"], dtype=object), allow_pickle=True)
    else:
        np.save(d, x)
    _refused(_compile(p, tmp_path / "out", "--data", str(d)), capsys, tmp_path / "out", pattern)


# ------------------------------------------------------------------------------------------ output directory
def test_unwritable_output_dir(tmp_path, capsys):
    p = _npy_model(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    out = blocker / "out"
    rc = main(_compile(p, out))
    err = capsys.readouterr().err
    assert rc == 2 and re.fullmatch(r"edgec: error: cannot write output directory .*\n", err), err
    assert blocker.read_text() == "a file, not a directory"


def _good_artifact(tmp_path, capsys) -> tuple[Path, Path, dict]:
    p = _npy_model(tmp_path)
    out = tmp_path / "out"
    assert main(_compile(p, out)) == 0, capsys.readouterr().err
    return p, out, {f.name: f.read_bytes() for f in out.iterdir()}


def test_disk_full_during_write_keeps_previous_artifact(tmp_path, capsys, monkeypatch):
    p, out, before = _good_artifact(tmp_path, capsys)
    import edgec.core.onnx_io as io

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io.os, "fsync", full)
    rc = main(_compile(p, out, "--seed", "1"))
    monkeypatch.setattr(io.os, "fsync", real_fsync)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("edgec: error: "), err
    assert "No space left on device" in lines[0] and "Traceback" not in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before, "the previous artifact changed"
    assert not list(tmp_path.glob(".out.partial-*")) and not list(tmp_path.glob(".out.old-*"))


def test_file_size_limit_subprocess_keeps_previous_artifact(tmp_path, capsys):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses to grow any file past 512 bytes; model.onnx is larger) in a fresh process."""
    import resource

    p, out, before = _good_artifact(tmp_path, capsys)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    r = subprocess.run([sys.executable, "-m", "pipeline", *_compile(p, out, "--seed", "2")], capture_output=True,
                       text=True, cwd=ROOT, preexec_fn=limit, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("edgec: error: ") and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in lines[0], lines[0]
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.partial-*"))


# ------------------------------------------------------------------------------------------ the real exit code
@pytest.mark.parametrize("case", ["truncated", "escape"])
def test_subprocess_exit_code_no_traceback(tmp_path, case, sentinel):
    mdir = tmp_path / "m"
    if case == "truncated":
        good = _conv_model().SerializeToString()
        p = _save(onnx.ModelProto(), mdir / "t.onnx")
        p.write_bytes(good[:-40])
        pattern = r"t\.onnx is not a valid ONNX protobuf"
    else:
        mdir.mkdir()
        p = _external_model(mdir, "../secret/passwd")
        pattern = r"refusing external data '\.\./secret/passwd' of tensor 'w': path escapes the model directory"
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pipeline", *_compile(p, out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and re.search(pattern, lines[0]) and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def _if_model(branch_reads: str) -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Relu", [branch_reads], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", T.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["a"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", T.FLOAT, [1, 4])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="pre"),
             helper.make_node("ReduceSum", ["a"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])],
                          [numpy_helper.from_array(np.float32(0), "zero")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_reads_from_outer_scope_are_accepted_and_dangling_ones_refused(tmp_path):
    ok = _save(_if_model("a"), tmp_path / "m" / "if_ok.onnx")
    m = load_onnx_file(ok)
    assert [n.op_type for n in m.graph.node][-1] == "If"
    bad = _save(_if_model("nowhere"), tmp_path / "m" / "if_bad.onnx")
    with pytest.raises(EdgecError, match=r"subgraph 'then'.*reads 'nowhere'.*dangling"):
        load_onnx_file(bad)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_inf_in_pth_weights_found_before_export(tmp_path, capsys, bad):
    import torch
    import torchvision

    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float(bad)
    w = tmp_path / "w.pth"
    torch.save(sd, w)
    out = tmp_path / "out"
    _refused(["compile", "--model", "torchvision:resnet18", "--weights", str(w), "--out", str(out), *FAST], capsys, out,
             rf"resnet18: weight 'layer1.0.conv1.weight' contains {int(bad == 'nan')} NaN and {int(bad == 'inf')} Inf value")


def test_unused_graph_input_is_dropped_and_compiles(tmp_path, capsys):
    """Exporters leave unused inputs behind; cleanup would drop them anyway, so import drops them (with a warning)
    instead of every verification run feeding a name the optimized graph no longer has."""
    m = _conv_model()
    m.graph.input.append(helper.make_tensor_value_info("leftover_mask", T.FLOAT, [1, 8]))
    p = _save(m, tmp_path / "m" / "unused.onnx")
    assert [i.name for i in load_onnx_file(p).graph.input] == ["x"]
    out = tmp_path / "out"
    assert main(_compile(p, out)) == 0
    err = capsys.readouterr().err
    assert "input(s) leftover_mask are not used by the graph; dropped" in err
    assert [i.name for i in onnx.load(str(out / "model.onnx")).graph.input] == ["x"]
