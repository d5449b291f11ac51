"""`remove_parallel_` (`row_constraints.py`) on the CPU compiled (numba): one pass over the rows, each row of
the gradient and of W_dec read once from memory, where torch's three kernels read them five times.

Measured at [9216, 576], 2 threads: 1.0 ms against 4.1 ms. (Renormalising the rows is two torch kernels
already as fast as a compiled pass: 0.6 ms.)
"""

from __future__ import annotations

import torch
from numba import njit, prange

from saelab.kernels.numba_threads import numba_threads

ROWS_PER_TASK = 64


def remove_parallel_(grad: torch.Tensor, weight: torch.Tensor, tiny_squared_norm: float) -> None:
    """g_i ← g_i − (g_i·w_i / max(‖w_i‖², tiny)) w_i for every row, in place; both contiguous [n, d]."""
    with numba_threads():
        _remove_parallel(grad.numpy(), weight.detach().numpy(), tiny_squared_norm)


@njit(parallel=True, cache=True, boundscheck=False, fastmath=True)
def _remove_parallel(grad, weight, tiny_squared_norm):  # noqa: ANN001, ANN202 (numba arrays)
    n, d = weight.shape
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            g, w = grad[i], weight[i]
            along, squared_norm = 0.0, 0.0
            for c in range(d):
                along += g[c] * w[c]
                squared_norm += w[c] * w[c]
            scale = along / max(squared_norm, tiny_squared_norm)
            for c in range(d):
                g[c] -= scale * w[c]
