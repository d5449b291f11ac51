"""Triton versions of `row_constraints.py` (same names, same contracts): one program per row of W_dec.

A program walks its row in BLOCK columns twice: first the row's sums (‖w‖², and g·w for the gradient
projection), then the update. Sums accumulate in float32 (float64 for float64 rows). Imported only
when Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # columns per step of a row


@triton.jit
def _remove_parallel_kernel(grad_ptr, weight_ptr, stride, d, tiny, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * stride
    along = tl.zeros([BLOCK], dtype=ACC)
    squared = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < d
        w = tl.load(weight_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        g = tl.load(grad_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        along += g * w
        squared += w * w
    scale = tl.sum(along, axis=0) / tl.maximum(tl.sum(squared, axis=0), tiny)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < d
        w = tl.load(weight_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        g = tl.load(grad_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        tl.store(grad_ptr + row + cols, (g - scale * w).to(grad_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _normalize_rows_kernel(weight_ptr, stride, d, eps, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * stride
    squared = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        w = tl.load(weight_ptr + row + cols, mask=cols < d, other=0.0).to(ACC)
        squared += w * w
    scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(squared, axis=0)), eps)
    for start in range(0, d, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < d
        w = tl.load(weight_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        tl.store(weight_ptr + row + cols, (w * scale).to(weight_ptr.dtype.element_ty), mask=inside)


def remove_parallel_(grad: torch.Tensor, weight: torch.Tensor, tiny: float) -> None:
    n, d = weight.shape
    if n and d:
        block = min(BLOCK, triton.next_power_of_2(d))
        _remove_parallel_kernel[(n,)](grad, weight, weight.stride(0), d, tiny, block, _accumulator(weight))


def normalize_rows_(weight: torch.Tensor, eps: float) -> None:
    n, d = weight.shape
    if n and d:
        block = min(BLOCK, triton.next_power_of_2(d))
        _normalize_rows_kernel[(n,)](weight, weight.stride(0), d, eps, block, _accumulator(weight))


def _accumulator(weight: torch.Tensor) -> tl.dtype:
    return tl.float64 if weight.dtype == torch.float64 else tl.float32
