"""Triton versions of the three sparse products in `sparse_ops.py` (same names, same contracts).

One program per (row, block of d) for `rows_matmul` and per (row, block of k) for the sampled dot;
all accumulate in float32 (float64 for float64 inputs).

`rows_transpose_matmul` sorts the batch's (token, slot) pairs by latent (one sort of batch·k keys;
`searchsorted` finds where each latent's pairs start and which latent each program serves, so the
host never waits for the device), then runs one program per (chunk of at most PAIRS_PER_PROGRAM of a
latent's pairs, block of d), in two launches. The first has one program per latent, for its first
chunk, and stores the row: every row of the output is written once by a plain store (a latent with
no pairs, zeros), so the output needs no zero-fill. The second adds the further chunks of latents
firing on many tokens into their rows atomically, so no program walks thousands of pairs while the
rest of the GPU idles. Only those rows' float32 sums can differ in the last bits run to run. The
atomic version this replaces issued one atomic add per pair and column. Imported only when Triton is
installed.
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
    extra_latent_ptr,
    first_extra_ptr,
    starts_ptr,
    pairs_ptr,
    val_ptr,
    dense_ptr,
    out_ptr,
    n,
    k,
    d,
    FIRST: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    if FIRST:  # program i: latent i's first chunk (no pairs: a row of zeros)
        latent = tl.program_id(0)
        chunk = 0
    else:  # program i: the i-th of all latents' further chunks; the grid is an upper bound on their number
        latent = tl.load(extra_latent_ptr + tl.program_id(0))
        chunk = 1 + tl.program_id(0) - tl.load(first_extra_ptr + tl.minimum(latent, n - 1))
    if latent < n:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < d
        begin = tl.load(starts_ptr + latent) + chunk * PAIRS
        end = tl.minimum(begin + PAIRS, tl.load(starts_ptr + latent + 1))
        acc = tl.zeros([BLOCK], dtype=ACC)
        for position in range(begin, end):  # pairs as flat indices token·k + slot
            pair = tl.load(pairs_ptr + position)
            weight = tl.load(val_ptr + pair).to(ACC)
            acc += weight * tl.load(dense_ptr + (pair // k) * d + cols, mask=inside, other=0.0).to(ACC)
        if FIRST:
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
    if not (n and d and batch and k):
        return torch.zeros(n, d, device=dense.device, dtype=dense.dtype)
    out = torch.empty(n, d, device=dense.device, dtype=_accumulator(dense))  # every row is stored by a first chunk
    latents, pairs = torch.sort(indices.reshape(-1), stable=True)
    # latent i's pairs are pairs[starts[i] : starts[i + 1]]
    starts = torch.searchsorted(latents, torch.arange(n + 1, device=latents.device))
    extra = (starts[1:] - starts[:-1] - 1).clamp_min(0) // PAIRS_PER_PROGRAM  # chunks after each latent's first
    extra_ends = extra.cumsum(0)
    # Σ extra_i ≤ batch·k // P: a grid size known without reading `extra` back from the device
    rest = batch * k // PAIRS_PER_PROGRAM
    extra_latent = torch.searchsorted(extra_ends, torch.arange(rest, device=latents.device), right=True)
    args = (extra_latent, extra_ends - extra, starts, pairs, values.contiguous(), dense.contiguous(), out, n, k, d)
    columns = triton.cdiv(d, BLOCK_LATENT_D)
    # the first chunks store, then the further ones add (launches run in order on the stream)
    for first, programs in ((True, n), (False, rest)):
        if programs:
            _rows_transpose_matmul_kernel[(programs, columns)](
                *args, first, PAIRS_PER_PROGRAM, BLOCK_LATENT_D, _triton_dtype(dense)
            )
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
