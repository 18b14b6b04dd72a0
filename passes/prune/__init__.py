"""Structured channel removal on ONNX graphs.

graph.py  channel dependency groups (which channel slots must shrink together) and the analytic cost model:
          MACs(node) = MACs_0(node) * prod_t kept(t) / C(t) over the node's channel-carrying in/out tensors t.
apply.py  physical removal: slice initializers, rewrite attributes and shape constants, drop dead nodes.
"""
