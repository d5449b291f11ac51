"""Each row's top-k on the CPU in one compiled pass per row (numba): `row_topk`'s group maxima, without its
four passes over the whole [batch, n] matrix.

The algorithm is `selection.row_topk`'s (its docstring says why it is exact), taken row by row so that a
row is read from memory once and its later steps run in cache:

1. the maxima of GROUP strided groups (group j = entries j, j + m, j + 2m, …; vectorised);
2. θ = the k-th largest group maximum, by a k-entry min-heap: every top-k entry is ≥ θ;
3. the entries ≥ θ of the groups whose maximum is ≥ θ (typically a few more than k), and the k largest
   of those by a second heap; ties at the k-th value are kept in row order.

At [4096, 9216], k 32 on 2 threads this took 14 ms against the torch route's 35 ms (4,608 latents: 10
against 26; 36,864: 29 against 74). Groups of 32 rather than the torch route's 16: the heap over the
group maxima is the costly step here, and halving the groups saved more than doubling the candidates
cost (16: 16.5 ms, 64: 13.9, at 9,216). torch has no fused row top-k on the CPU; numba compiles these
loops to vector code and caches it on disk (the first call in a fresh environment compiles for ~4 s).

NaN is never kept (torch.topk ranks it first): pre-activations with NaN mean the SAE has diverged.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from saelab.kernels.numba_threads import numba_threads
from saelab.kernels.selection import COMPILED_GROUP as GROUP

ROWS_PER_TASK = 64  # rows a thread takes at a time; its scratch buffers are allocated once per task


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [batch, k] of the k largest scores per row, unsorted; scores: a contiguous CPU float
    matrix [batch, n], n a multiple of GROUP and n / GROUP > k (`selection.row_topk` checks)."""
    batch = scores.shape[0]
    values = torch.empty(batch, k, dtype=scores.dtype)
    indices = torch.empty(batch, k, dtype=torch.long)
    with numba_threads():
        _rows_topk(scores.detach().numpy(), k, values.numpy(), indices.numpy())
    return values, indices


@njit(parallel=True, cache=True, boundscheck=False, fastmath=True)
def _rows_topk(scores, k, out_values, out_indices):  # noqa: ANN001, ANN202 (numba arrays)
    batch, n = scores.shape
    m = n // GROUP
    for task in prange((batch + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        group_max = np.empty(m, dtype=scores.dtype)
        heap = np.empty(k, dtype=scores.dtype)
        candidates = np.empty(n, dtype=scores.dtype)
        positions = np.empty(n, dtype=np.int64)
        for row_index in range(task * ROWS_PER_TASK, min(batch, (task + 1) * ROWS_PER_TASK)):
            row = scores[row_index]
            group_max[:] = row[:m]
            for t in range(1, GROUP):  # a constant trip count: fastmath turns this into vector max
                for g in range(m):
                    entry = row[t * m + g]
                    group_max[g] = entry if entry > group_max[g] else group_max[g]
            threshold = _kth_largest(group_max, m, k, heap)
            count = 0
            for g in range(m):
                if group_max[g] >= threshold:
                    for t in range(GROUP):
                        entry = row[t * m + g]
                        if entry >= threshold:
                            candidates[count], positions[count] = entry, t * m + g
                            count += 1
            cut = _kth_largest(candidates, count, k, heap)
            _keep_from(candidates, positions, count, cut, k, out_values[row_index], out_indices[row_index])


@njit(boundscheck=False)
def _kth_largest(values, count, k, heap):  # noqa: ANN001, ANN202
    """The k-th largest of values[:count] (count ≥ k), by a min-heap of the k largest seen so far."""
    heap[:k] = values[:k]
    for i in range(k // 2 - 1, -1, -1):
        _sift_down(heap, i, k)
    for i in range(k, count):
        if values[i] > heap[0]:
            heap[0] = values[i]
            _sift_down(heap, 0, k)
    return heap[0]


@njit(boundscheck=False, inline="always")
def _sift_down(heap, i, k):  # noqa: ANN001, ANN202
    entry = heap[i]
    while 2 * i + 1 < k:
        child = 2 * i + 1
        if child + 1 < k and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= entry:
            break
        heap[i] = heap[child]
        i = child
    heap[i] = entry


@njit(boundscheck=False)
def _keep_from(candidates, positions, count, cut, k, values, indices):  # noqa: ANN001, ANN202
    """The candidates above `cut`, then as many equal to it as fill k slots."""
    kept = 0
    for i in range(count):
        if candidates[i] > cut:
            values[kept], indices[kept] = candidates[i], positions[i]
            kept += 1
    for i in range(count):
        if kept == k:
            break
        if candidates[i] == cut:
            values[kept], indices[kept] = candidates[i], positions[i]
            kept += 1
