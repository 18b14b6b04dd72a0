"""Mixed-bit quantization: Q/DQ insertion by a target-supplied dialect, sensitivity, bit allocation."""
