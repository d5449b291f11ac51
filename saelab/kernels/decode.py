"""Sparse decode: x̂ = Σ_j values[b, j] · W_dec[indices[b, j]], with a backward over the kept rows only.

    ∂L/∂values[b, j] = ∂L/∂x̂[b] · W_dec[indices[b, j]]      (sampled_dot)
    ∂L/∂W_dec[i]     = Σ_{b,j: indices[b,j]=i} values[b, j] · ∂L/∂x̂[b]   (rows_transpose_matmul)

Both cost batch·k·d, against batch·n·d for the dense z W_dec and its backward. On the CPU with numba both
come from one pass over the pairs grouped by latent (`compiled_sparse.decode_backward`).
"""

from __future__ import annotations

import torch

from saelab.kernels.backend import use_compiled, use_triton_kernel
from saelab.kernels.phases import DECODE, DECODER_BACKWARD, phase
from saelab.kernels.sparse_ops import is_full, rows_matmul, rows_transpose_matmul, sampled_dot


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """indices, values: [batch, k]; W_dec: [n, d] → [batch, d] (no decoder bias)."""
    return _SparseDecode.apply(indices, values, W_dec)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, values, W_dec):
        ctx.save_for_backward(indices, values, W_dec)
        with phase(DECODE):
            return rows_matmul(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad):
        indices, values, W_dec = ctx.saved_tensors
        with phase(DECODER_BACKWARD):
            grad = grad.contiguous().to(W_dec.dtype)
            if _compiled_backward(ctx, indices, W_dec):
                from saelab.kernels import compiled_sparse

                return None, *compiled_sparse.decode_backward(indices, values, grad, W_dec)
            grad_values = sampled_dot(indices, grad, W_dec) if ctx.needs_input_grad[1] else None
            grad_W = (
                rows_transpose_matmul(indices, values.to(W_dec.dtype), grad, W_dec.shape[0])
                if ctx.needs_input_grad[2]
                else None
            )
        return None, grad_values, grad_W


def _compiled_backward(ctx, indices: torch.Tensor, W_dec: torch.Tensor) -> bool:  # noqa: ANN001 (autograd's ctx)
    """Whether both gradients come from `compiled_sparse.decode_backward`: on the CPU with numba, where the
    pairs are sparse (full rows are one dense product each) and no Triton kernel is asked for."""
    return (
        all(ctx.needs_input_grad[1:])
        and use_compiled(W_dec)
        and not use_triton_kernel("sampled_dot", W_dec)
        and not is_full(indices, W_dec.shape[0])
    )
