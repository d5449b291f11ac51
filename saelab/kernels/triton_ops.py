"""Triton versions of the three sparse products in `sparse_ops.py` (same names, same contracts).

One program per (row, block of d) for `rows_matmul` and per (row, block of k) for the sampled dot;
all accumulate in float32 (float64 for float64 inputs).

`rows_transpose_matmul` sorts the batch's (token, slot) pairs by latent (one sort of batch·k keys;
`searchsorted` finds where each latent's pairs start and which latent each program serves, so the
host never waits for the device), then runs one program per (chunk of at most PAIRS_PER_PROGRAM of a
latent's pairs, block of d). A latent whose pairs fit one chunk (most latents) has its output row
written once, by a plain store; a latent firing on many tokens is spread over several programs that
add into its row atomically, so no program walks thousands of pairs while the rest of the GPU idles.
Only those rows' float32 sums can differ in the last bits run to run. The atomic version this replaces
issued one atomic add per pair and column. Imported only when Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 64
BLOCK_K = 16
BLOCK_LATENT_D = 256  # columns per program of rows_transpose_matmul
PAIRS_PER_PROGRAM = 64  # a latent's pairs per program of rows_transpose_matmul (the load-balancing chunk)


@triton.jit
def _rows_matmul_kernel(idx_ptr, val_ptr, dense_ptr, out_ptr, k, d, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < d
    acc = tl.zeros([BLOCK], dtype=ACC)
    for j in range(k):
        latent = tl.load(idx_ptr + row * k + j)
        weight = tl.load(val_ptr + row * k + j).to(ACC)
        acc += weight * tl.load(dense_ptr + latent * d + cols, mask=inside, other=0.0).to(ACC)
    tl.store(out_ptr + row * d + cols, acc, mask=inside)


@triton.jit
def _rows_transpose_matmul_kernel(
    chunk_latent_ptr,
    first_chunk_ptr,
    starts_ptr,
    pairs_ptr,
    val_ptr,
    dense_ptr,
    out_ptr,
    n,
    k,
    d,
    PAIRS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    latent = tl.load(chunk_latent_ptr + chunk)
    if latent < n:  # the grid is an upper bound on the chunks; the programs past the last one have no work
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < d
        latent_begin = tl.load(starts_ptr + latent)
        latent_end = tl.load(starts_ptr + latent + 1)
        begin = latent_begin + (chunk - tl.load(first_chunk_ptr + latent)) * PAIRS
        end = tl.minimum(begin + PAIRS, latent_end)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for position in range(begin, end):  # pairs as flat indices token·k + slot
            pair = tl.load(pairs_ptr + position)
            weight = tl.load(val_ptr + pair).to(ACC)
            acc += weight * tl.load(dense_ptr + (pair // k) * d + cols, mask=inside, other=0.0).to(ACC)
        if latent_end - latent_begin <= PAIRS:  # this latent's only program
            tl.store(out_ptr + latent * d + cols, acc, mask=inside)
        else:
            tl.atomic_add(out_ptr + latent * d + cols, acc, mask=inside)


@triton.jit
def _sampled_dot_kernel(
    idx_ptr, left_ptr, dense_ptr, out_ptr, k, d, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr
):
    row = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_inside = slots < k
    latents = tl.load(idx_ptr + row * k + slots, mask=slot_inside, other=0)
    acc = tl.zeros([BLOCK_K], dtype=ACC)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        inside = cols < d
        left = tl.load(left_ptr + row * d + cols, mask=inside, other=0.0).to(ACC)
        rows = tl.load(
            dense_ptr + latents[:, None] * d + cols[None, :],
            mask=slot_inside[:, None] & inside[None, :],
            other=0.0,
        ).to(ACC)
        acc += tl.sum(rows * left[None, :], axis=1)
    tl.store(out_ptr + row * k + slots, acc, mask=slot_inside)


def rows_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(indices.shape[0], dense.shape[1], device=dense.device, dtype=_accumulator(dense))
    return _launch(_rows_matmul_kernel, triton.cdiv(dense.shape[1], BLOCK_D), indices, values, dense, out, BLOCK_D)


def rows_transpose_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
    batch, k = indices.shape
    d = dense.shape[1]
    out = torch.zeros(n, d, device=dense.device, dtype=_accumulator(dense))  # the rows added into need zeros
    if not (n and d and batch and k):
        return out.to(dense.dtype)
    latents, pairs = torch.sort(indices.reshape(-1), stable=True)
    # latent i's pairs are pairs[starts[i] : starts[i + 1]]
    starts = torch.searchsorted(latents, torch.arange(n + 1, device=latents.device))
    chunks = ((starts[1:] - starts[:-1] + PAIRS_PER_PROGRAM - 1) // PAIRS_PER_PROGRAM).clamp_min(1)
    chunk_ends = chunks.cumsum(0)
    # Σ max(1, ⌈c_i / P⌉) ≤ n + batch·k // P: a grid size known without reading `chunks` back from the device
    grid = n + batch * k // PAIRS_PER_PROGRAM
    chunk_latent = torch.searchsorted(chunk_ends, torch.arange(grid, device=latents.device), right=True)
    args = (chunk_latent, chunk_ends - chunks, starts, pairs, values.contiguous(), dense.contiguous(), out, n, k, d)
    blocks = (grid, triton.cdiv(d, BLOCK_LATENT_D))
    _rows_transpose_matmul_kernel[blocks](*args, PAIRS_PER_PROGRAM, BLOCK_LATENT_D, _triton_dtype(dense))
    return out.to(dense.dtype)


def sampled_dot(indices: torch.Tensor, left: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(indices.shape, device=dense.device, dtype=_accumulator(dense))
    blocks = triton.cdiv(indices.shape[1], BLOCK_K)
    return _launch(_sampled_dot_kernel, blocks, indices, left, dense, out, BLOCK_K, BLOCK_D)


def _launch(
    kernel: triton.runtime.JITFunction,
    blocks: int,
    indices: torch.Tensor,
    operand: torch.Tensor,
    dense: torch.Tensor,
    out: torch.Tensor,
    *block_sizes: int,
) -> torch.Tensor:
    """Run `kernel` on a (batch, blocks) grid into the zeroed `out`; returns it in `dense`'s dtype."""
    batch, k = indices.shape
    if batch and k:
        args = (indices.contiguous(), operand.contiguous(), dense.contiguous(), out, k, dense.shape[1])
        kernel[(batch, blocks)](*args, *block_sizes, _triton_dtype(dense))
    return out.to(dense.dtype)


def _accumulator(dense: torch.Tensor) -> torch.dtype:
    return torch.float64 if dense.dtype == torch.float64 else torch.float32


def _triton_dtype(dense: torch.Tensor) -> tl.dtype:
    return tl.float64 if dense.dtype == torch.float64 else tl.float32
