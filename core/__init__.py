"""The bottom layer: errors, ONNX I/O and ORT sessions, the fidelity comparator, provenance. Imports nothing of edgec."""
