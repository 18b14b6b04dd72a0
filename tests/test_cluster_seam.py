"""The executor seam without a cluster: spec parsing, the default, and the one-line errors (fast; no Ray started).

The real-cluster behaviour (workers, retries, lost nodes, remote probes) is tested in tests/test_cluster.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from edgec.core import executor as X
from edgec.core.errors import EdgecError

pytestmark = pytest.mark.timeout(60)

NO_RAY = "import sys; sys.modules['ray'] = None; "  # `import ray` raises ImportError, as without the extra


@pytest.mark.parametrize("spec,expected", [
    ("auto", ("auto", None)), ("local:2", ("local", 2)), ("local:1", ("local", 1)),
    ("ray://10.0.0.5:10001", ("client", "ray://10.0.0.5:10001")), ("head.lab:6379", ("gcs", "head.lab:6379")),
    ("127.0.0.1:6379", ("gcs", "127.0.0.1:6379")), (" local:4 ", ("local", 4)),
])
def test_parse_cluster(spec, expected):
    assert X.parse_cluster(spec) == expected


@pytest.mark.parametrize("spec", ["local:0", "local:x", "local:", "ray://", "ray://host", "host:0", "host:70000",
                                  "yes", "http://h:1", "local:999"])
def test_parse_cluster_rejects(spec):
    with pytest.raises(EdgecError) as e:
        X.parse_cluster(spec)
    assert "\n" not in str(e.value) and "--cluster" in str(e.value)


def test_default_is_in_process(monkeypatch):
    monkeypatch.delenv(X.ENV, raising=False)
    assert X.make_executor() is X.IN_PROCESS
    assert X.make_executor("") is X.IN_PROCESS and X.make_executor("off") is X.IN_PROCESS
    monkeypatch.setenv(X.ENV, "none")
    assert X.make_executor() is X.IN_PROCESS
    monkeypatch.setenv(X.ENV, "bogus")
    with pytest.raises(EdgecError, match="--cluster expects"):
        X.make_executor()
    assert X.make_executor("") is X.IN_PROCESS  # an explicit empty spec wins over the environment


def test_in_process_map_order_and_exceptions():
    def f(i):
        if i == 2:
            raise ValueError("two")
        return i * i

    assert X.IN_PROCESS.map(lambda i: i + 1, range(4)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="two"):
        X.IN_PROCESS.map(f, range(4))
    res = X.IN_PROCESS.map(f, range(4), return_exceptions=True)
    assert res[:2] == [0, 1] and isinstance(res[2], ValueError) and res[3] == 9
    obj = object()
    assert X.IN_PROCESS.get(X.IN_PROCESS.put(obj)) is obj and X.get_handle(obj) is obj


def test_without_ray_cluster_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(EdgecError, match=r"pip install 'edgec\[ray\]'"):
        X.make_executor("local:2")


@pytest.mark.parametrize("argv", [
    ["-m", "edgec.pipeline.artifacts", "artifacts.yaml", "--cluster", "local:2"],
    ["-m", "edgec", "bench-farm", "out/none", "--devices", "jetson_orin_nano", "--cluster", "auto"],
])
def test_cli_without_ray_one_line_exit_2(argv):
    mod, rest = argv[1], argv[2:]
    code = NO_RAY + f"import runpy; sys.argv = ['x', *{rest!r}]; runpy.run_module({mod!r}, run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "edgec" in lines[0] and "pip install 'edgec[ray]'" in lines[0], p.stderr


def test_bench_farm_needs_a_cluster(run_cli, monkeypatch, tmp_path):
    monkeypatch.delenv(X.ENV, raising=False)
    p = run_cli("bench-farm", str(tmp_path), "--devices", "jetson_orin_nano", timeout=60)
    assert p.returncode == 2 and "need a Ray cluster" in p.stderr and len(p.stderr.strip().splitlines()) == 1
