"""The class-based pass contract (passes/base.py): Options validated from recipes, requires/ensures enforced by the
runner, in-place passes handed a private copy, typed stats slots serialized under the report's keys, and function
passes running unchanged through the FunctionPass adapter."""
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgec.core.errors import EdgecError, PassFailed
from edgec.core.onnx_io import ort_session
from edgec.passes import base as B
from edgec.pipeline.recipe import load_recipe
from edgec.pipeline.runner import run_recipe


def _model(identities: int = 2) -> onnx.ModelProto:
    nodes, prev = [], "x"
    for i in range(identities):
        nodes.append(helper.make_node("Identity", [prev], [f"i{i}"], name=f"id{i}"))
        prev = f"i{i}"
    nodes.append(helper.make_node("Relu", [prev], ["y"], name="relu"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


class DropIdentity(B.Pass):
    """Identity nodes removed; each consumer reads the Identity's input (exact)."""

    name = "test_drop_identity"
    exact = True
    in_place = True

    @dataclass(frozen=True)
    class Options:
        limit: int = 100
        break_it: bool = False  # leave one Identity behind: ensures() must catch it

    def requires(self, model, ctx):
        if not any(n.op_type == "Identity" for n in model.graph.node):
            raise EdgecError("nothing to drop: the model has no Identity node")

    def ensures(self, model):
        if any(n.op_type == "Identity" for n in model.graph.node):
            raise EdgecError("an Identity node is left")

    def call(self, model, ctx, opts):
        ids = [n for n in model.graph.node if n.op_type == "Identity"][: opts.limit]
        if opts.break_it:
            ids = ids[1:]
        for n in reversed(ids):
            for m in model.graph.node:
                m.input[:] = [n.input[0] if i == n.output[0] else i for i in m.input]
            model.graph.node.remove(n)
        return B.PassResult(model, bool(ids), floor={"met": True}, region={"nodes": 0}, plots={"curve": "c.png"},
                            extra={"removed": len(ids)})


@pytest.fixture
def registered():
    B._load_all()
    B.register_pass_class(DropIdentity)
    yield B.get_pass(DropIdentity.name)
    del B._REGISTRY[DropIdentity.name]


def _ctx():
    return B.PassContext(calib_batches=lambda: iter([{"x": np.array([[-1.0, 0.5, 2.0, -3.0]], np.float32)}]))


def test_class_pass_through_the_runner_in_place_on_a_copy(registered):
    assert registered.exact and registered.in_place and registered.doc.startswith("Identity nodes removed")
    m = _model(2)
    before = m.SerializeToString()
    res = run_recipe(m, load_recipe(f"[{DropIdentity.name}]"), _ctx())
    assert m.SerializeToString() == before  # the runner handed the in-place pass a private copy
    assert [n.op_type for n in res.model.graph.node] == ["Relu"]
    st = res.stages[-1].stats
    assert st["removed"] == 2 and st["floor"] == {"met": True} and st["postprocess"] == {"nodes": 0}
    assert st["curve_png"] == "c.png"
    x = {"x": np.array([[-1.0, 0.5, 2.0, -3.0]], np.float32)}
    np.testing.assert_array_equal(ort_session(res.model, optimize=False).run(None, x)[0], np.maximum(x["x"], 0))


@pytest.mark.parametrize("model, options, needle", [
    (_model(0), {}, "nothing to drop"),                 # requires() fails before the pass runs
    (_model(2), {"break_it": True}, "an Identity node is left"),  # ensures() fails after it
])
def test_broken_contract_is_pass_failed_naming_the_pass(registered, model, options, needle):
    rec = load_recipe(f"[{{{DropIdentity.name}: {{break_it: true}}}}]" if options else f"[{DropIdentity.name}]")
    with pytest.raises(PassFailed) as e:
        run_recipe(model, rec, _ctx())
    assert DropIdentity.name in str(e.value) and needle in str(e.value)


def test_options_are_validated_and_must_be_frozen(registered):
    with pytest.raises(EdgecError, match="unknown option"):
        B.make_options(registered, {"nope": 1})
    assert B.make_options(registered, {"limit": 1}).limit == 1

    class Loose(B.Pass):
        """A pass whose options are mutable."""
        name = "test_loose"

        @dataclass
        class Options:
            a: int = 1

    with pytest.raises(ValueError, match="frozen"):
        B.register_pass_class(Loose)


def test_function_pass_adapter_and_legacy_stats_lift_into_slots():
    spec = B.get_pass("remove_identity")
    assert isinstance(spec.impl, B.FunctionPass) and not spec.in_place and spec.exact
    r = B.PassResult(_model(0), True, {"floor": {"met": False}, "postprocess": {"a": 1}, "pareto_png": "p.png", "k": 3})
    assert r.floor == {"met": False} and r.region == {"a": 1} and r.plots == {"pareto": "p.png"}
    assert r.extra == {"k": 3}
    assert r.stats == {"floor": {"met": False}, "postprocess": {"a": 1}, "pareto_png": "p.png", "k": 3}
