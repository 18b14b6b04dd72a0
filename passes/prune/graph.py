"""Channel dependency groups on an ONNX graph, and the analytic cost model of removing channels.

Every channel-carrying activation tensor t gets a *layout*: its channel axis and, for each position along that
axis, an element id. Producers (Conv/ConvTranspose/Gemm/MatMul with constant weights) create fresh element ids
for their output channels; shape-preserving ops pass layouts through (Transpose/Squeeze move the axis, Concat
concatenates, Split/Slice cut, Flatten/Reshape repeat each element over the merged trailing positions);
elementwise ops with several channel-carrying inputs couple the inputs position by position (union), and a
depthwise conv couples its output channel i with its input channel i. A *channel* of a group is a connected
component of elements; a *group* is the set of channels with the same occurrence count in every tensor, so
every tensor holds either all of a group or none of it, and removing k of a group's channels shrinks each
tensor t by r(t, g) * k positions (r > 1 after Flatten). Hence the cost model is exact and linear per factor:

    MACs(node; keep) = MACs_0(node) * prod_{t in node's tracked in/out} kept(t) / C(t),  kept(t) = sum_g r(t,g) k_g
    params(keep)     = params_0 + sum_init size_0(init) * (prod_axes kept(t_axis) / C(t_axis) - 1)

Anything not understood (an unsupported op, a non-constant weight, a Reshape that splits the channel axis,
a normalization over channels, a graph input/output) closes every channel it touches as unprunable, with a reason.

Contract for callers (criteria, allocation, recovery):
  * Group channel i is the same channel in every tensor/weight of the group ("canonical order" = the order in
    its first producer's output). `remove_channels(model, {g.id: kept_indices})` takes indices in that order.
  * align > 1 (grouped convs): the group splits into `align` equal contiguous blocks, and a valid keep has
    equally many channels in every block; `select_channels(g, scores, k)` picks such a set, `round_keep` a count.
  * stat_tensor[:, stat_offset:stat_offset+size] along stat_axis (1 for NCHW, 3 for NHWC MatMul blocks) holds
    the group's channels contiguously, in canonical order, after the nonlinearity that feeds the next layer.
  * producer_weights also returns the depthwise convs moving with the group (role 'dw'); consumer_layers gives
    each consumer's 'positions' (size, r): the input positions of every channel (r > 1 after Flatten).
  * The analysis is cached by graph structure; weight values are always read from the model passed in.

Modules (this one is the public entry and re-exports what callers use):
  layout.py      ChannelRef, Group, the analysis's layout/rewrite records, op tables
  fold.py        static shapes by evaluating shape sub-graphs; folding small constant sub-graphs (prune's pre-step)
  handlers.py    per-op layout handlers
  analysis.py    _Analysis: propagation, couplings, components, groups of components
  groups.py      Groups from the analysis, their statistics tensors, the structure cache (_analysis, analyze)
  weights.py     producer/consumer weights, bn_scales, consumer_layers (read from the model passed in)
  cost_model.py  CostModel
"""
from __future__ import annotations

import numpy as np

from edgec.core.graph import node_names
from edgec.passes.prune.cost_model import CostModel
from edgec.passes.prune.cost_model import _check_groups  # noqa: F401  (re-exported: apply.py)
from edgec.passes.prune.groups import _analysis  # noqa: F401  (re-exported: apply, evaluate, prune_pass, tests)
from edgec.passes.prune.groups import analyze
from edgec.passes.prune.layout import ChannelRef, Group
from edgec.passes.prune.weights import _node_index  # noqa: F401  (re-exported: evaluate.py)
from edgec.passes.prune.weights import bn_scales, consumer_layers, consumer_weights, producer_weights

__all__ = ["ChannelRef", "Group", "analyze", "producer_weights", "consumer_weights", "bn_scales",
           "consumer_layers", "CostModel", "select_channels", "round_keep", "node_names"]


def round_keep(g: Group, n: float, round_to: int = 1) -> int:
    """A valid kept count near n on the group's grid: multiples of lcm(round_to, align), or of align when that lcm
    exceeds the group (allocate.unit); the group's size is always valid."""
    from edgec.passes.prune.allocate import round_keep as _round

    return _round(n, g.size, round_to, g.align)


def select_channels(g: Group, scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Sorted indices of the n_keep highest-scoring channels, equally many per alignment block."""
    scores = np.asarray(scores, np.float64)
    a = max(1, g.align)
    if n_keep % a:
        raise ValueError(f"group {g.id}: kept count {n_keep} is not a multiple of its alignment {a}")
    bs = g.size // a
    per = n_keep // a
    keep = []
    for b in range(a):
        sl = scores[b * bs:(b + 1) * bs]
        top = np.argsort(-sl, kind="stable")[:per]
        keep.append(np.sort(top) + b * bs)
    return np.concatenate(keep).astype(np.int64)
