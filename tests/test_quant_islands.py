"""Island filling after the quant floor's promotions (passes.quant.quant_pass): runs of <= n int8 layers between two
fp32 layers become fp32; runs touching the model's ends, and longer runs, stay."""
from __future__ import annotations

import pytest

from edgec.passes.quant.quant_pass import islands_filled

F, Q = 32, 8


@pytest.mark.parametrize("bits,n,expect", [
    ("F8F88F88", 1, "FFF88F88"),   # the single island closes; the trailing run touches the end
    ("F8F88F88", 2, "FFFFFF88"),
    ("88F8F888", 1, "88FFF888"),   # a leading run stays (no fp32 layer before it)
    ("F888F", 2, "F888F"),         # a run of 3 is not an island at n = 2
    ("F888F", 3, "FFFFF"),
    ("88888", 2, "88888"),         # no fp32 layer: nothing to fill
    ("FFFFF", 1, "FFFFF"),
])
def test_islands_filled(bits, n, expect):
    order = [f"l{i}" for i in range(len(bits))]
    b = {l: (F if c == "F" else Q) for l, c in zip(order, bits)}
    got = islands_filled(b, order, n)
    assert "".join("F" if got[l] == F else "8" for l in order) == expect
    assert b == {l: (F if c == "F" else Q) for l, c in zip(order, bits)}  # the input is not modified
