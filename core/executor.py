"""The executor seam: `map(fn, items) -> results`, in the items' order, whatever runs them.

Everything that evaluates many independent candidates (prune's sensitivity scan, GA fitness, quant's per-layer
sensitivity, floor bisection candidates, artifact builds, coverage benches) calls `executor.map` instead of a loop.
Results must not depend on how many workers there are or in which order they finish: `fn` is a pure function of
its item, and any randomness inside it is seeded from the item (never from a worker or a global generator).

Large shared inputs (a model, calibration arrays) go through `executor.put(obj)` once and are passed to `fn` as the
returned handle; `executor.get(handle)` inside `fn` returns the object. In process the handle is the object itself.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    name: str
    workers: int

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "") -> list[R]: ...

    def put(self, obj: Any) -> Any: ...

    def get(self, handle: Any) -> Any: ...


class InProcess:
    """The default: runs `fn` over the items here, one after another."""

    name = "in-process"
    workers = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, desc: str = "") -> list[R]:
        return [fn(it) for it in items]

    def put(self, obj: Any) -> Any:
        return obj

    def get(self, handle: Any) -> Any:
        return handle


IN_PROCESS = InProcess()
