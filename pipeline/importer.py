"""Importing ONNX files from any exporter, without trusting them.

load_onnx_file(path) checks, in this order, and stops at the first problem with one EdgecError line:
  1. the file: a regular file, not over protobuf's 2 GB limit (checked with stat, before any read);
  2. the protobuf parses (truncated / corrupt files are refused);
  3. the model skeleton: ir_version, a default-domain opset, a non-empty graph;
  4. every tensor (initializers, Constant attributes, subgraphs): dims >= 0, and the stored element count equals
     prod(dims); external-data references stay inside the model's directory (relative, no `..`, no absolute path,
     no symlink out, a regular file) and lie within that file; nothing is read before all references are checked;
  5. graph structure: every input of every node is produced by a graph input, an initializer or an earlier node;
     no tensor is produced twice; no cycles (an acyclic but unsorted graph is sorted);
  6. every op is a known ONNX / ONNX-ML / com.microsoft operator or a model-local function;
  7. the ONNX checker passes (on the model *without* its external data loaded, so a model whose weights exceed
     protobuf's 2 GB limit is still checked);
  8. then external data is read (only the validated byte ranges) and weights are checked for NaN/Inf.

Input shapes (--input-shape, --dynamic) are planned in edgec.pipeline.input_shapes.

Models over protobuf's 2 GiB limit: checked without their weights; `ort_source` hands ORT a path with external data.
"""
from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from edgec.core.errors import EdgecError
from edgec.core.onnx_io import _first_line

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1            # a serialized ModelProto cannot be larger
LARGE_MODEL_BYTES = 1_800_000_000     # above this (proto + external data) the model is kept/checked via external data
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
MIN_OPSET = 7

_TYPED_FIELD = {  # data_type -> (field holding the values when raw_data is empty, values per element)
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
}
_PACKED4 = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


# ----------------------------------------------------------------------------------------------- loading
def load_onnx_file(path: str | os.PathLike, *, max_bytes: int | None = None) -> onnx.ModelProto:
    """Parse and validate an ONNX file from an untrusted source (see the module docstring for the rules).

    max_bytes: refuse a model whose file plus external data exceed this (the --max-memory budget).
    """
    path = Path(path)
    name = path.name
    try:
        st = path.stat()
    except OSError as e:
        raise EdgecError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise EdgecError(f"{path} is not a regular file")
    if st.st_size > PROTOBUF_LIMIT:
        raise EdgecError(f"{name} is {st.st_size / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one ONNX file; "
                         f"save it with its weights as external data (onnx.save_model(..., save_as_external_data=True))")
    if max_bytes is not None and st.st_size > max_bytes:
        raise EdgecError(f"{name} is {st.st_size / 2**20:.0f} MiB, more than the memory limit of {max_bytes / 2**20:.0f} MiB")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EdgecError(f"cannot read {path}: {e.strerror}") from None
    return load_onnx_bytes(data, name=name, base_dir=path.parent, max_bytes=max_bytes)


def load_onnx_bytes(data: bytes, *, name: str = "model.onnx", base_dir: str | os.PathLike | None = None,
                    max_bytes: int | None = None) -> onnx.ModelProto:
    """Parse and validate serialized ONNX; external data is resolved inside `base_dir` only."""
    if not data:
        raise EdgecError(f"{name} is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise EdgecError(f"{name} is not a valid ONNX protobuf (corrupt or truncated): {_first_line(e)}") from None
    validate_model(model, name)
    drop_unused_inputs(model, name)
    ext = plan_external_data(model, name, base_dir)
    total = len(data) + sum(r[3] for r in ext)
    if max_bytes is not None and total > max_bytes:
        raise EdgecError(f"{name} needs {total / 2**20:.0f} MiB for its weights, more than the memory limit of "
                         f"{max_bytes / 2**20:.0f} MiB")
    _run_checker(_without_external(model) if ext else model, name)
    if ext:
        read_external_data(ext, name)
    from edgec.pipeline.guards import check_finite_weights

    check_finite_weights(model, name)
    if total > LARGE_MODEL_BYTES:
        log.info("%s holds %.2f GiB of weights: it is kept as external data when written", name, total / 2**30)
    return model


def drop_unused_inputs(model: onnx.ModelProto, name: str = "model") -> list[str]:
    """Graph inputs no node reads (exporters leave them behind) are removed, as cleanup would remove them later;
    keeping them would make every verification run feed a name the optimized graph no longer has."""
    g = model.graph
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in g.node:
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                read |= _subgraph_free_names(sg)
    inits = {t.name for t in g.initializer}
    unused = [i.name for i in g.input if i.name not in read and i.name not in inits]
    if unused and len(unused) < len([i for i in g.input if i.name not in inits]):
        keep = [i for i in g.input if i.name not in unused]
        del g.input[:]
        g.input.extend(keep)
        log.warning("%s: input(s) %s are not used by the graph; dropped", name, ", ".join(unused))
        return unused
    return []


def _without_external(model: onnx.ModelProto) -> onnx.ModelProto:
    """A small copy for the checker: external initializers become typed graph inputs (their data is checked by
    plan_external_data), so the checker never needs the weights in memory nor a path to the model."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, moved = [], []
    for t in m.graph.initializer:
        (moved if t.data_location == onnx.TensorProto.EXTERNAL else keep).append(t)
    if moved:
        listed = {i.name for i in m.graph.input}
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
        m.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in moved if t.name not in listed)
    for t in iter_tensors(m):  # external tensors inside attributes (rare): zeros of the right size
        if t.data_location == onnx.TensorProto.EXTERNAL:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = bytes(tensor_nbytes(t))
    return m


def _run_checker(model: onnx.ModelProto, name: str) -> None:
    """The ONNX checker, on the model without external data (tensors still reference their files)."""
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as e:  # onnx raises several unrelated types
        raise EdgecError(f"{name} fails the ONNX checker: {_first_line(e)}") from None


# ----------------------------------------------------------------------------------------------- structure
def validate_model(model: onnx.ModelProto, name: str = "model") -> None:
    """Skeleton, tensors, structure and ops. Raises EdgecError; sorts an acyclic unsorted graph in place."""
    if not model.HasField("graph"):
        raise EdgecError(f"{name} has no graph (not an ONNX model, or truncated)")
    if model.ir_version <= 0:
        raise EdgecError(f"{name} has no ir_version (not an ONNX model, or truncated)")
    if model.ir_version > onnx.IR_VERSION:
        raise EdgecError(f"{name} has IR version {model.ir_version}; this onnx supports up to {onnx.IR_VERSION}")
    opsets = {}
    for o in model.opset_import:
        opsets[o.domain or ""] = o.version
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None:
        raise EdgecError(f"{name} imports no default ONNX opset")
    if not MIN_OPSET <= default <= onnx.defs.onnx_opset_version():
        raise EdgecError(f"{name} uses ONNX opset {default}; edgec supports opsets {MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
    if not model.graph.node:
        raise EdgecError(f"{name} has an empty graph")
    _check_names(model.graph, name)
    for t in iter_tensors(model):
        check_tensor_size(t, name)
    functions = {(f.domain, f.name) for f in model.functions}
    _check_graph(model.graph, name, outer=set(), functions=functions, opsets=opsets)


def _bad_text(s) -> bool:
    return not isinstance(s, str) or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in s)


def _check_names(g: onnx.GraphProto, name: str) -> None:
    """Names and op types must be text without control characters (a corrupt file often has neither)."""
    def bad(kind, s):
        shown = repr(s)[:60]
        raise EdgecError(f"{name}: {kind} {shown} is not valid text (control characters or invalid UTF-8: corrupt file?)")

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if _bad_text(vi.name):
            bad("value name", vi.name)
    for t in g.initializer:
        if _bad_text(t.name):
            bad("initializer name", t.name)
    for n in g.node:
        for kind, s in (("op type", n.op_type), ("domain", n.domain), ("node name", n.name)):
            if _bad_text(s):
                bad(kind, s)
        for s in list(n.input) + list(n.output):
            if _bad_text(s):
                bad("tensor name", s)
        for a in n.attribute:
            if _bad_text(a.name):
                bad("attribute name", a.name)
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _check_names(sg, name)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers and tensor attributes, in the main graph and all subgraphs."""
    def graph_tensors(g):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for n in g.node:
            yield from node_tensors(n)

    def node_tensors(n):
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            if a.HasField("g"):
                yield from graph_tensors(a.g)
            for sg in a.graphs:
                yield from graph_tensors(sg)

    yield from graph_tensors(model.graph)
    for f in model.functions:
        for n in f.node:
            yield from node_tensors(n)


def _elem_count(t: onnx.TensorProto, name: str) -> int:
    if any(d < 0 for d in t.dims):
        raise EdgecError(f"{name}: tensor '{t.name}' has a negative dimension {list(t.dims)}")
    return math.prod(int(d) for d in t.dims)


def tensor_nbytes(t: onnx.TensorProto, name: str = "model") -> int:
    """Bytes of the tensor's raw (little-endian) encoding, from its dims and data type."""
    n = _elem_count(t, name)
    if t.data_type in _PACKED4:
        return (n + 1) // 2
    if t.data_type == onnx.TensorProto.STRING:
        raise EdgecError(f"{name}: string tensor '{t.name}' cannot be stored as raw or external data")
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        raise EdgecError(f"{name}: tensor '{t.name}' has unknown data type {t.data_type}") from None
    return n * itemsize


def check_tensor_size(t: onnx.TensorProto, name: str = "model") -> None:
    """The stored data must hold exactly prod(dims) elements (external data is checked against its file later)."""
    if t.data_type == onnx.TensorProto.UNDEFINED:
        raise EdgecError(f"{name}: tensor '{t.name}' has no data type")
    if t.HasField("segment"):
        raise EdgecError(f"{name}: tensor '{t.name}' is segmented, which edgec does not support")
    n = _elem_count(t, name)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        tensor_nbytes(t, name)  # type must have a fixed size
        return
    if t.raw_data:
        want = tensor_nbytes(t, name)
        if len(t.raw_data) != want:
            raise EdgecError(f"{name}: tensor '{t.name}' has shape {list(t.dims)} ({n} elements, {want} bytes) but "
                             f"stores {len(t.raw_data)} bytes")
        return
    field, per = _TYPED_FIELD.get(t.data_type, ("int32_data", 1))
    have = len(getattr(t, field))
    want = n * per
    if t.data_type in _PACKED4:
        want = (n + 1) // 2
    if have != want:
        raise EdgecError(f"{name}: tensor '{t.name}' has shape {list(t.dims)} ({n} elements) but stores {have} values")


def _subgraph_free_names(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes."""
    defined = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    free = set()
    for n in g.node:
        for i in n.input:
            if i not in defined:
                free.add(i)
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                free |= {x for x in _subgraph_free_names(sg) if x not in defined}
        defined.update(n.output)
    for o in g.output:
        if o.name not in defined:
            free.add(o.name)
    return free


def _node_label(n: onnx.NodeProto, idx: int) -> str:
    return f"'{n.name}' ({n.op_type})" if n.name else f"#{idx} ({n.op_type})"


def _check_graph(g: onnx.GraphProto, name: str, outer: set[str], functions: set, opsets: dict) -> None:
    where = f"{name}" if not outer else f"{name} (subgraph '{g.name}')"
    inputs = {i.name for i in g.input}
    inits = {i.name for i in g.initializer} | {s.values.name for s in g.sparse_initializer}
    available = inputs | inits | outer | {""}
    producer: dict[str, int] = {}
    for idx, n in enumerate(g.node):
        for o in n.output:
            if not o:
                continue
            if o in producer:
                raise EdgecError(f"{where}: tensor '{o}' is produced twice (by nodes {_node_label(g.node[producer[o]], producer[o])} "
                                 f"and {_node_label(n, idx)})")
            if o in inputs or o in inits:
                raise EdgecError(f"{where}: node {_node_label(n, idx)} overwrites graph input/initializer '{o}'")
            producer[o] = idx
    deps: list[set[int]] = []
    for idx, n in enumerate(g.node):
        _check_op(n, idx, where, functions, opsets)
        reads = list(n.input)
        subgraphs = [sg for a in n.attribute for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs)]
        if subgraphs:  # If/Loop/Scan bodies may read any name of the enclosing scope
            sub_defined = available | set(producer)
            for sg in subgraphs:
                _check_graph(sg, name, outer=sub_defined, functions=functions, opsets=opsets)
                reads += sorted(_subgraph_free_names(sg))
        d = set()
        for i in reads:
            if i in producer:
                d.add(producer[i])
            elif i not in available:
                raise EdgecError(f"{where}: node {_node_label(n, idx)} reads '{i}', which no node, graph input or "
                                 f"initializer produces (dangling input)")
        deps.append(d)
    for o in g.output:
        if o.name not in producer and o.name not in available:
            raise EdgecError(f"{where}: graph output '{o.name}' is produced by no node (dangling output)")
    order = _topo_order(deps, g, where)
    if order != list(range(len(g.node))):
        log.info("%s: nodes were not in topological order; sorted", where)
        nodes = [onnx.NodeProto() for _ in order]
        for k, i in enumerate(order):
            nodes[k].CopyFrom(g.node[i])
        del g.node[:]
        g.node.extend(nodes)


def _topo_order(deps: list[set[int]], g: onnx.GraphProto, where: str) -> list[int]:
    """Kahn's algorithm, stable (keeps the file's order where possible); a cycle is an error naming its nodes."""
    indeg = [len(d) for d in deps]
    users: list[list[int]] = [[] for _ in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    import heapq

    ready = [i for i, k in enumerate(indeg) if k == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(deps):
        left = [i for i in range(len(deps)) if indeg[i] > 0]
        cycle = _find_cycle(deps, set(left))
        names = " -> ".join(_node_label(g.node[i], i) for i in cycle)
        raise EdgecError(f"{where}: the graph has a cycle: {names}")
    return order


def _find_cycle(deps: list[set[int]], nodes: set[int]) -> list[int]:
    start = min(nodes)
    seen: dict[int, int] = {}
    path = []
    cur = start
    while cur not in seen:
        seen[cur] = len(path)
        path.append(cur)
        nxt = sorted(d for d in deps[cur] if d in nodes)
        if not nxt:
            return path
        cur = nxt[0]
    return path[seen[cur]:] + [cur]


def _check_op(n: onnx.NodeProto, idx: int, where: str, functions: set, opsets: dict) -> None:
    dom = n.domain or ""
    if (dom, n.op_type) in functions:
        return
    if dom not in KNOWN_DOMAINS:
        raise EdgecError(f"{where}: node {_node_label(n, idx)} uses op '{n.op_type}' from unknown domain '{dom}'; "
                         f"edgec runs ops from ai.onnx, ai.onnx.ml and com.microsoft only (custom-op libraries are not supported)")
    if dom not in opsets and not (dom == "ai.onnx" and "" in opsets):
        raise EdgecError(f"{where}: node {_node_label(n, idx)} uses domain '{dom or 'ai.onnx'}' which the model does not import")
    if dom in ("", "ai.onnx", "ai.onnx.ml") and not onnx.defs.has(n.op_type, dom if dom != "ai.onnx" else ""):
        raise EdgecError(f"{where}: node {_node_label(n, idx)} uses '{n.op_type}', which is not an ONNX operator")


# ----------------------------------------------------------------------------------------------- external data
def _unsafe_location(loc: str) -> str | None:
    """Why an external-data location is refused, or None when it is a plain relative path."""
    if not isinstance(loc, str):
        return "location is not valid UTF-8 text"
    if not loc:
        return "empty location"
    if "\x00" in loc:
        return "NUL byte in path"
    if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
        return "absolute path"
    parts = loc.replace("\\", "/").split("/")
    if ".." in parts:
        return "path escapes the model directory"
    return None


def plan_external_data(model: onnx.ModelProto, name: str, base_dir) -> list[tuple]:
    """Validate every external-data reference before anything is read.

    Returns [(tensor, file path, offset, length)]. The file must be a regular file inside `base_dir`
    (after resolving symlinks) and [offset, offset+length) must lie within it; length must equal the
    byte size implied by the tensor's dims and type.
    """
    plans = []
    base = None
    for t in iter_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            if t.external_data:
                raise EdgecError(f"{name}: tensor '{t.name}' has external-data fields but is not marked external")
            continue
        info = {}
        for kv in t.external_data:
            info[kv.key] = kv.value
        loc = info.get("location", "")
        why = _unsafe_location(loc)
        if why:
            loc = loc if isinstance(loc, str) and not _bad_text(loc) else repr(loc)[:60]
            raise EdgecError(f"{name}: refusing external data '{loc}' of tensor '{t.name}': {why}; "
                             f"external data must be a file inside the model's directory")
        if base_dir is None:
            raise EdgecError(f"{name}: tensor '{t.name}' references external data but the model has no directory")
        if base is None:
            base = Path(base_dir).resolve()
        p = (base / loc)
        try:
            real = p.resolve(strict=True)
        except (OSError, RuntimeError):
            raise EdgecError(f"{name}: external data file '{loc}' of tensor '{t.name}' does not exist") from None
        if real != base and base not in real.parents:
            raise EdgecError(f"{name}: refusing external data '{loc}' of tensor '{t.name}': it resolves outside the "
                             f"model's directory")
        st = real.stat()
        if not stat.S_ISREG(st.st_mode):
            raise EdgecError(f"{name}: external data '{loc}' of tensor '{t.name}' is not a regular file")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise EdgecError(f"{name}: tensor '{t.name}' has a non-integer external-data offset/length") from None
        want = tensor_nbytes(t, name)
        if length is None:
            length = want
        if offset < 0 or length != want:
            raise EdgecError(f"{name}: tensor '{t.name}' has shape {list(t.dims)} ({want} bytes) but its external data "
                             f"says offset {offset}, length {length}")
        if offset + length > st.st_size:
            raise EdgecError(f"{name}: external data '{loc}' is {st.st_size} bytes, too short for tensor '{t.name}' "
                             f"(needs bytes {offset}..{offset + length})")
        plans.append((t, real, offset, length))
    return plans


def read_external_data(plans: list[tuple], name: str) -> None:
    """Read each validated byte range into its tensor's raw_data (one open per file)."""
    by_file: dict[Path, list[tuple]] = {}
    for t, p, off, n in plans:
        by_file.setdefault(p, []).append((t, off, n))
    for p, items in by_file.items():
        try:
            with open(p, "rb") as f:
                for t, off, n in sorted(items, key=lambda it: it[1]):
                    f.seek(off)
                    buf = f.read(n)
                    if len(buf) != n:
                        raise EdgecError(f"{name}: external data '{p.name}' ended early reading tensor '{t.name}'")
                    t.raw_data = buf
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
        except OSError as e:
            raise EdgecError(f"{name}: cannot read external data '{p.name}': {e.strerror}") from None


def ort_source(model: onnx.ModelProto, workdir: str | os.PathLike, *, threshold: int | None = None) -> bytes | str:
    """What to hand onnxruntime.InferenceSession: the serialized model, or -- for a model over LARGE_MODEL_BYTES
    (protobuf cannot serialize past 2 GiB) -- the path of a copy written into `workdir` with its weights as
    external data. The caller owns `workdir` (ORT has read the weights once the session exists)."""
    limit = LARGE_MODEL_BYTES if threshold is None else threshold
    if model.ByteSize() <= limit:
        return model.SerializeToString(deterministic=True)
    path = Path(workdir) / "model.onnx"
    big = onnx.ModelProto()
    big.CopyFrom(model)
    onnx.save_model(big, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return str(path)
