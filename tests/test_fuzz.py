"""Fuzzing the import + verify path with mutated small ONNX files.

Every mutation (random byte flips, truncations, inserted bytes, and structured field edits: op types, node inputs,
dims, data types, attributes, opset/IR versions, external-data locations, deleted/duplicated nodes, self-loops)
must end in either a valid, runnable model or edgec's own EdgecError -- never another exception, never a hang.
The loop runs in-process (no subprocess per mutation) under a data-segment rlimit, so a mutated shape that asks
for tens of GB fails to allocate instead of exhausting the machine. Seeded: failures name the mutation to replay.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T

from edgec.calib.data import synthetic_splits
from edgec.pipeline.compile import _inputs
from edgec.core.errors import EdgecError
from edgec.pipeline.guards import check_activation_budget, data_limit
from edgec.pipeline.importer import load_onnx_bytes
from edgec.pipeline.input_shapes import fix_input_shapes
from edgec.pipeline.runner import verify
from edgec.testing import realworld_models as rw
from tests.test_hostile import OpenLog

N_MUTATIONS = 1500
TIME_BUDGET_S = 120.0
PER_CASE_S = 15


def _seeds() -> dict[str, bytes]:
    tiny_paddle = rw.paddle_model(11, blocks=4, init_as_inputs=True)
    for inp in tiny_paddle.graph.input[:1]:  # small static shape keeps each ORT run ~1 ms
        for d, v in zip(inp.type.tensor_type.shape.dim, (1, 3, 16, 16)):
            d.Clear()
            d.dim_value = v
    models = {"paddle": tiny_paddle, "yolo": rw.ultralytics_model(), "attention": rw.attention_model(d=16, heads=2),
              "cnn": rw.external_cnn()}
    for name in ("yolo",):
        for d, v in zip(models[name].graph.input[0].type.tensor_type.shape.dim, (1, 3, 32, 32)):
            d.Clear()
            d.dim_value = v
    return {k: m.SerializeToString(deterministic=True) for k, m in models.items()}


def import_and_verify(data: bytes, base_dir: Path) -> onnx.ModelProto:
    """The compile path for an ONNX file up to (and including) verifying the imported graph."""
    model = load_onnx_bytes(data, name="fuzz.onnx", base_dir=base_dir)
    model = fix_input_shapes(model, {}, default_hw=16)
    inputs = _inputs(model)
    if not inputs:
        raise EdgecError("the model has no graph inputs")
    if sum(int(np.prod(i.shape)) * np.dtype(i.dtype).itemsize for i in inputs) > 64 << 20:
        raise EdgecError("inputs over the fuzz budget")
    check_activation_budget(model, 256 << 20)
    calib, _ = synthetic_splits(inputs, 1, 1, seed=0)
    verify(model, [calib.feeds(0)], stage="import", ran=())
    return model


# ------------------------------------------------------------------------------------------ mutators
def _flip(rng, b: bytes) -> bytes:
    a = bytearray(b)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, len(a)))
        a[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(a)


def _truncate(rng, b: bytes) -> bytes:
    return b[: int(rng.integers(0, len(b)))]


def _insert(rng, b: bytes) -> bytes:
    i = int(rng.integers(0, len(b)))
    return b[:i] + rng.bytes(int(rng.integers(1, 16))) + b[i:]


def _random_node(rng, m):
    return m.graph.node[int(rng.integers(0, len(m.graph.node)))]


def _all_names(m):
    return [i.name for i in m.graph.input] + [t.name for t in m.graph.initializer] + [o for n in m.graph.node for o in n.output]


def _edit(rng, b: bytes) -> bytes:
    m = onnx.ModelProto()
    m.ParseFromString(b)
    kind = int(rng.integers(0, 14))
    n = _random_node(rng, m)
    if kind == 0:
        n.op_type = str(rng.choice(["Relu", "Conv", "MatMul", "Reshape", "Concat", "Softmax", "NoSuchOp", "Loop", "If"]))
    elif kind == 1 and n.input:
        names = _all_names(m) + ["ghost", ""]
        n.input[int(rng.integers(0, len(n.input)))] = str(rng.choice(names))
    elif kind == 2 and m.graph.initializer:
        t = m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]
        dims = list(t.dims)
        op = int(rng.integers(0, 3))
        if op == 0 and dims:
            dims[int(rng.integers(0, len(dims)))] = int(rng.choice([0, -1, 2, 7, 1 << 31, 1 << 62]))
        elif op == 1:
            dims.append(int(rng.integers(1, 4)))
        elif dims:
            dims.pop()
        del t.dims[:]
        t.dims.extend(dims)
    elif kind == 3 and m.graph.initializer:
        t = m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]
        t.data_type = int(rng.integers(0, 27))
    elif kind == 4 and n.attribute:
        a = n.attribute[int(rng.integers(0, len(n.attribute)))]
        if a.type == onnx.AttributeProto.INT:
            a.i = int(rng.choice([-3, -1, 0, 1, 5, 1 << 40]))
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[int(rng.integers(0, len(a.ints)))] = int(rng.choice([-2, 0, 1, 3, 1 << 33]))
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = float(rng.choice([0.0, -1.0, 1e30, np.nan]))
        else:
            a.name = "mangled"
    elif kind == 5:
        m.opset_import[0].version = int(rng.integers(0, 30))
    elif kind == 6:
        m.ir_version = int(rng.integers(0, 15))
    elif kind == 7 and m.graph.initializer:
        t = m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]
        t.ClearField("raw_data")
        t.data_location = T.EXTERNAL
        for k, v in (("location", str(rng.choice(["../../etc/passwd", "/etc/passwd", "w.bin", "", "a/../../x",
                                                    "/dev/zero", "..\\..\\x"]))),
                     ("length", str(int(rng.choice([0, 16, 1 << 40]))))):
            e = t.external_data.add()
            e.key, e.value = k, v
    elif kind == 8:
        del m.graph.node[int(rng.integers(0, len(m.graph.node)))]
    elif kind == 9:
        c = m.graph.node.add()
        c.CopyFrom(n)
    elif kind == 10 and n.output and n.input:
        n.input[0] = n.output[0]  # a self-loop
    elif kind == 11:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if dims:
            d = dims[int(rng.integers(0, len(dims)))]
            d.Clear()
            if rng.random() < 0.5:
                d.dim_value = int(rng.choice([0, 1, 5, 4096, 1 << 20]))
            else:
                d.dim_param = "fuzz"
    elif kind == 12 and m.graph.initializer:
        t = m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]
        t.raw_data = rng.bytes(int(rng.integers(0, 64)))
    elif kind == 13:
        m.graph.input[0].type.tensor_type.elem_type = int(rng.integers(0, 27))
    return m.SerializeToString()


MUTATORS = (_flip, _flip, _truncate, _insert, _edit, _edit, _edit, _edit)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def test_fuzz_import_and_verify(tmp_path):
    seeds = _seeds()
    names = sorted(seeds)
    base = tmp_path / "models"
    base.mkdir()
    (tmp_path / "w.bin").write_bytes(b"outside" * 100)  # a file outside the model dir that mutations may name
    rng = np.random.default_rng(20261122)
    outcomes = {"ok": 0, "error": 0}
    messages: dict[str, int] = {}
    old = signal.signal(signal.SIGALRM, _alarm)
    faulthandler.dump_traceback_later(TIME_BUDGET_S * 2, exit=True)  # a hang in native code still ends the run
    t0 = time.perf_counter()
    try:
        with data_limit(3 << 30), OpenLog() as log:
            for i in range(N_MUTATIONS):
                seed_name = names[i % len(names)]
                mut = MUTATORS[int(rng.integers(0, len(MUTATORS)))]
                data = mut(rng, seeds[seed_name])
                signal.alarm(PER_CASE_S)
                try:
                    import_and_verify(data, base)
                    outcomes["ok"] += 1
                except EdgecError as e:
                    outcomes["error"] += 1
                    msg = str(e)
                    assert msg and "\n" not in msg, f"mutation {i} ({seed_name}, {mut.__name__}): multi-line error {msg!r}"
                    key = msg.split(":")[0][:40]
                    messages[key] = messages.get(key, 0) + 1
                except _Timeout:
                    pytest.fail(f"mutation {i} ({seed_name}, {mut.__name__}) hung for more than {PER_CASE_S} s")
                except Exception as e:  # noqa: BLE001 - any other exception is the bug this test looks for
                    pytest.fail(f"mutation {i} ({seed_name}, {mut.__name__}) raised {type(e).__name__}: {e}")
                finally:
                    signal.alarm(0)
        outside = [p for p in log.touched(tmp_path / "w.bin")]
        assert not outside, "a mutated external-data path was opened outside the model directory"
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, old)
    elapsed = time.perf_counter() - t0
    assert sum(outcomes.values()) == N_MUTATIONS >= 300
    assert elapsed < TIME_BUDGET_S, f"{N_MUTATIONS} mutations took {elapsed:.0f} s"
    # the harness must exercise both outcomes, or it is not testing anything
    print(outcomes, sorted(messages.items(), key=lambda kv: -kv[1]))
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 100, (outcomes, messages)


def test_seeds_are_valid_and_run():
    for name, data in _seeds().items():
        m = import_and_verify(data, Path("."))
        assert m.graph.node, name
