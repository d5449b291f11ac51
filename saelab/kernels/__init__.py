"""Fused sparse encode/decode for TopK-family SAEs: one dense product, everything else touches k of n latents.

    encoded = sparse_encode(x, W_enc, b_enc, b_dec, [RowTopK(k)], tile=None)   # selection + sparse backward
    x̂ = sparse_decode(encoded.indices[0], encoded.values[0].relu(), W_dec) + b_dec

`reference.py` holds the dense definition of each kernel; Triton runs them on CUDA (`backend.py`).
"""

from saelab.kernels.decode import sparse_decode
from saelab.kernels.encode import Encoded, sparse_encode
from saelab.kernels.selection import AboveThreshold, BatchTopK, RowTopK, Selected

__all__ = ["AboveThreshold", "BatchTopK", "Encoded", "RowTopK", "Selected", "sparse_decode", "sparse_encode"]
