"""The shape lists kernel tests sweep: odd sizes first, real model shapes included."""

from __future__ import annotations

# Batch rows: 1-8 take the GEMV path, larger ones the dequantize + GEMM path.
M_VALUES = (1, 2, 3, 5, 8, 15, 16, 17, 33)

# (N, K): SmolLM2-135M's four linear shapes plus odd ones (N not a multiple of 8, K of 32 only,
# K not a multiple of 8).
NK_SHAPES = (
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (7, 96),
    (33, 160),
    (1, 128),
    (5, 100),  # K % 8 != 0: only per-channel groups divide it; exercises the scalar path
    (9, 40),  # K % 16 != 0: per-channel 4- and 2-bit groups cannot use the byte planes
)
