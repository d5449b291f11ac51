"""Sparse encode: u = (x − b_dec) W_enc + b_enc, a selection rule, and a backward that touches only the kept pairs.

Forward (no autograd graph over the dense product):
    for each tile of latents [start, start + T):   u_tile = (x − b_dec) W_enc[:, tile] + b_enc[tile]
        every rule's update(u_tile, start)            (the main selection and, for AuxK, a second one)
    values = u at the kept (token, latent) pairs

Backward, with g = ∂L/∂values ([batch, k], zero at padded slots) and S the sparse [batch, n] matrix of g:
    ∂L/∂W_enc = (x − b_dec)ᵀ S          batch·k·d multiply-adds, never a dense [batch, n] gradient
    ∂L/∂b_enc = column sums of S
    ∂L/∂b_dec = −W_enc (column sums of S)
    ∂L/∂x     = S W_encᵀ                 (only when x itself requires a gradient)

`tile=None` computes all n latents at once (fastest when memory allows); a tile bounds the peak
memory at O(batch · (k + tile)) instead of O(batch · n), for wide SAEs. Selection is exact in both:
the running top-k keeps the same pairs as one top-k over the whole row (ties aside). On a Triton
device a plain top-k's tiled mode is one fused kernel (`triton_topk`): u is never stored, whatever
the tile.

`matmul_dtype=torch.bfloat16` runs the dense product in bf16 (float32 accumulation); only the
choice of latents sees bf16 rounding, as the kept values are recomputed in float32 (`sampled_dot`).

A `Workspace` lets the tiles of u reuse one buffer from call to call: on the CPU a fresh
[4096, 9216] float32 tensor every step costs ~15% of the matmul in page faults alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from saelab.kernels.backend import backend_choice
from saelab.kernels.phases import ENCODER_BACKWARD, ENCODER_GEMM, SELECTION, phase
from saelab.kernels.selection import RowTopK, Selected
from saelab.kernels.sparse_ops import latent_sums, rows_matmul, rows_transpose_matmul, sampled_dot

# observe(u_tile: [batch, T], start): sees every tile of pre-activations (GBA's largest u per latent).
TileObserver = Callable[[torch.Tensor, int], None]


class SelectionRule(Protocol):
    def update(self, pre: torch.Tensor, start: int) -> None: ...

    def result(self) -> Selected: ...


class Workspace:
    """One flat buffer, grown when a call needs more, that the encode pass writes its tiles of u into."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of `shape` backed by the buffer (its contents are garbage)."""
        size = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffer = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)


@dataclass
class Encoded:
    """Kept pairs per rule, in the order the rules were given: indices and u at them ([batch, k_rule])."""

    indices: list[torch.Tensor]
    values: list[torch.Tensor]  # differentiable w.r.t. x, W_enc, b_enc, b_dec; 0 at padded slots
    valid: list[torch.Tensor | None]  # [batch, k_rule] bool where a rule pads its rows; None: every slot is real


def sparse_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    rules: Sequence[SelectionRule],
    tile: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    observe: TileObserver | None = None,
    workspace: Workspace | None = None,
) -> Encoded:
    """x: [batch, d], W_enc: [d, n], b_enc: [n], b_dec: [d]; every rule sees every tile of u.

    Rules must not keep views of a tile: with a `workspace` the next tile (or call) overwrites it.
    """
    with torch.no_grad():
        centered = x - b_dec
        selected = _fused_topk(centered, W_enc, b_enc, rules, tile, matmul_dtype, observe)
        if selected is None:
            _scan(centered, W_enc, b_enc, rules, tile, matmul_dtype, observe, workspace)
            selected = [rule.result() for rule in rules]
        # one rule: its own tensors (a cat would copy a `full_rows` view, which the products take as dense)
        indices, pre = selected[0].indices, selected[0].pre_activations
        if len(rules) > 1:
            indices = torch.cat([s.indices for s in selected], dim=-1)
            pre = torch.cat([s.pre_activations for s in selected], dim=-1)
        pre = pre.to(W_enc.dtype)
        if matmul_dtype is not None and matmul_dtype != W_enc.dtype:
            pre = sampled_dot(indices, centered, W_enc.T) + b_enc[indices]
        valid = _valid_mask(selected)
        if valid is not None:
            pre = pre * valid
    values = _GatheredPreactivations.apply(x, W_enc, b_enc, b_dec, indices, pre, valid, centered)
    widths = [s.indices.shape[-1] for s in selected]
    return Encoded([s.indices for s in selected], list(values.split(widths, dim=-1)), [s.valid for s in selected])


def _fused_topk(
    centered: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    rules: Sequence[SelectionRule],
    tile: int | None,
    matmul_dtype: torch.dtype | None,
    observe: TileObserver | None,
) -> list[Selected] | None:
    """The tiled mode of a plain per-token top-k on a Triton device: the product fused with the top-k
    (`triton_topk`), which never holds u at all. None where it does not apply (`fused_topk_choice`)."""
    dtype = matmul_dtype or W_enc.dtype
    if not fused_topk_choice(rules, tile, observe, W_enc.device, dtype)[0]:
        return None
    from saelab.kernels import triton_topk

    k = rules[0].k
    values, indices = triton_topk.encode_topk(centered, W_enc, b_enc, min(k, W_enc.shape[1]), dtype)
    return [Selected(indices, values)]


def fused_topk_choice(
    rules: Sequence[SelectionRule],
    tile: int | None,
    observe: TileObserver | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[bool, str]:
    """Whether the selection runs as the fused Triton product + top-k, and why (or why not): the scan runs
    where no tile is asked for (holding u whole is the measured fast path), for another rule or a second
    one (AuxK's rule needs u over its dead latents), with a tile observer, or for a k or dtype the kernel
    does not take. `dtype`: the product's."""
    rule = rules[0]
    if tile is None:
        return False, "no encoder_tile: u is computed whole, then selected (the measured fast path)"
    if observe is not None:
        return False, "a tile observer (GBA's largest u per latent) reads every tile of u"
    if not (len(rules) == 1 and isinstance(rule, RowTopK) and rule.ranks_all_by_u):
        return False, "not one plain per-token top-k (AuxK, a score hook, BatchTopK or a threshold)"
    backend = backend_choice(device)
    if not backend.triton:
        return False, backend.reason
    from saelab.kernels import triton_topk

    if not triton_topk.supports(rule.k, dtype):
        return False, f"the fused kernel does not take k {rule.k} in {dtype} (or this Triton has no tl.topk)"
    return True, "encoder_tile set, one plain top-k, Triton on: u is never stored"


def _scan(
    centered: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    rules: Sequence[SelectionRule],
    tile: int | None,
    matmul_dtype: torch.dtype | None,
    observe: TileObserver | None,
    workspace: Workspace | None,
) -> None:
    """Compute u tile by tile and feed each tile to every rule; no tile outlives its loop iteration."""
    n = W_enc.shape[1]
    dtype = matmul_dtype or W_enc.dtype
    left = centered.to(dtype)
    for start in range(0, n, tile or n):
        end = min(n, start + (tile or n))
        out = workspace.take((len(left), end - start), dtype, left.device) if workspace is not None else None
        # In bf16 the tile stays bf16: rules only rank it, and the kept values are recomputed in float32.
        with phase(ENCODER_GEMM):
            pre = torch.addmm(b_enc[start:end].to(dtype), left, W_enc[:, start:end].to(dtype), out=out)
        with phase(SELECTION):
            for rule in rules:
                rule.update(pre, start)
            if observe is not None:
                observe(pre, start)
        del pre


def _valid_mask(selected: list[Selected]) -> torch.Tensor | None:
    if all(s.valid is None for s in selected):
        return None
    return torch.cat(
        [torch.ones_like(s.indices, dtype=torch.bool) if s.valid is None else s.valid for s in selected], -1
    )


class _GatheredPreactivations(torch.autograd.Function):
    """values = u at the kept pairs (computed by the scan); the backward is the sparse one above."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, indices, pre, valid, centered):
        ctx.save_for_backward(centered, W_enc, indices, valid)  # centered = x − b_dec, from the scan
        return pre.clone()

    @staticmethod
    def backward(ctx, grad):
        with phase(ENCODER_BACKWARD):
            return _GatheredPreactivations._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        centered, W_enc, indices, valid = ctx.saved_tensors
        if valid is not None:
            grad = grad * valid
        n = W_enc.shape[1]
        grad = grad.to(W_enc.dtype)
        per_latent = latent_sums(indices, grad, n)
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            grad_x = rows_matmul(indices, grad, W_enc.T.contiguous())
        if ctx.needs_input_grad[1]:
            grad_W = _encoder_gradient(indices, grad, centered.to(W_enc.dtype), W_enc)
        if ctx.needs_input_grad[2]:
            grad_b_enc = per_latent
        if ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc @ per_latent)
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None


def _encoder_gradient(
    indices: torch.Tensor, grad: torch.Tensor, centered: torch.Tensor, W_enc: torch.Tensor
) -> torch.Tensor:
    """∂L/∂W_enc = (x − b_dec)ᵀ S, [d, n], in W_enc's layout: a row-major W_enc (the CPU's) gets it written
    column by column, which the compiled product does directly; a column-major one (CUDA's, a tied encoder)
    gets the [n, d] product's transpose, a view."""
    n = W_enc.shape[1]
    if W_enc.is_contiguous():
        return rows_transpose_matmul(indices, grad, centered, n, transposed=True)
    return _in_layout_of(W_enc, rows_transpose_matmul(indices, grad, centered, n).T)


def _in_layout_of(parameter: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`grad` with `parameter`'s memory layout, copied only if it differs: autograd would otherwise copy it
    into that layout itself, and a tied encoder (GBA's W_enc, a view of W_decᵀ) takes the view as it is."""
    return grad if grad.stride() == parameter.stride() else grad.contiguous()
