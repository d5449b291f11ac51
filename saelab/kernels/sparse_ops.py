"""The three sparse products every sparse encode/decode backward is made of, on rows given as (indices, values).

A batch of sparse rows is `indices, values: [batch, k]`: row b is Σ_j values[b, j] · e_{indices[b, j]}
in a space of n latents (duplicate indices add up). With `dense` a matrix:

    rows_matmul(indices, values, dense)            out[b] = Σ_j values[b, j] · dense[indices[b, j]]    [batch, d]
    rows_transpose_matmul(indices, values, dense)  out[i] = Σ_{b,j: indices[b,j]=i} values[b, j] · dense[b]  [n, d]
    sampled_dot(indices, left, dense)              out[b, j] = left[b] · dense[indices[b, j]]        [batch, k]

Each costs batch·k·d multiply-adds instead of the batch·n·d of the dense product. On CUDA with
Triton they run as Triton kernels (`triton_ops.py`), each once checked against its reference
(`self_check.py`); on the CPU `rows_transpose_matmul` runs compiled where numba is installed
(`compiled_sparse.py`); elsewhere as torch's embedding_bag and sparse CSR products (MKL on x86),
which never materialise a [batch, k, d] tensor. `reference.py` holds the dense definitions.

Rows that hold every latent in order (`full_rows`: what a selection returns when most pairs are kept,
as a ReLU SAE's early in training) are a dense matrix, and each product is then one dense matmul:
sparse formats cost more than the dense product at such densities.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from saelab.kernels.backend import use_compiled, use_triton_kernel

# torch flags every CSR tensor as beta; these products are covered by saelab's own tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def full_rows(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """indices [batch, n] whose every row is 0, 1, …, n − 1 (a view: no batch·n memory)."""
    return torch.arange(n, device=device).expand(batch, n)


def is_full(indices: torch.Tensor, n: int) -> bool:
    """Whether `indices` are `full_rows` of n latents, so that the sparse rows are a dense [batch, n] matrix."""
    return indices.shape[-1] == n and indices.stride() == (0, 1) and int(indices[0, -1]) == n - 1


def gather_latents(per_latent: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """per_latent[indices]: a per-latent quantity [n] at the kept slots [batch, k] (full rows: a view)."""
    if is_full(indices, per_latent.shape[0]):
        return per_latent.expand(indices.shape)
    return per_latent[indices]


def latent_sums(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """out[i] = Σ_{b,j: indices[b,j]=i} values[b, j], [n]."""
    if is_full(indices, n):
        return values.sum(0)
    return values.new_zeros(n).index_add_(0, indices.reshape(-1), values.reshape(-1))


def rows_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_j values[b, j] · dense[indices[b, j]]; dense: [n, d] → [batch, d]."""
    if is_full(indices, dense.shape[0]):
        return values.to(dense.dtype) @ dense
    if use_triton_kernel("rows_matmul", dense):
        from saelab.kernels import triton_ops

        return triton_ops.rows_matmul(indices, values, dense)
    return F.embedding_bag(indices, dense, per_sample_weights=values.to(dense.dtype), mode="sum")


def rows_transpose_matmul(
    indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, n: int, transposed: bool = False
) -> torch.Tensor:
    """out[i] = Σ_{b,j: indices[b,j]=i} values[b, j] · dense[b]; dense: [batch, d] → [n, d], or with
    `transposed` its transpose [d, n] laid out row-major (a row-major W_enc's gradient)."""
    if is_full(indices, n):
        return dense.T @ values.to(dense.dtype) if transposed else values.to(dense.dtype).T @ dense
    if use_triton_kernel("rows_transpose_matmul", dense):
        from saelab.kernels import triton_ops

        out = triton_ops.rows_transpose_matmul(indices, values, dense, n)
        return out.T.contiguous() if transposed else out
    if use_compiled(dense):
        from saelab.kernels import compiled_sparse

        return compiled_sparse.rows_transpose_matmul(indices, values, dense.contiguous(), n, transposed)
    if transposed:
        return rows_transpose_matmul(indices, values, dense, n).T.contiguous()
    # addmm with beta 0 into an uninitialised `out` (beta 0 ignores its contents, NaNs included) skips the
    # zero-fill and the copy around MKL's product: at 9216 × 576, batch 4096, 4.1 ms against 6.3 for
    # mm(out=) and 7.2 for `@`.
    out = dense.new_empty(n, dense.shape[1])
    return torch.addmm(out, _csr_by_latent(indices, values.to(dense.dtype), n), dense, beta=0.0, out=out)


def sampled_dot(indices: torch.Tensor, left: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """out[b, j] = left[b] · dense[indices[b, j]]; left: [batch, d], dense: [n, d] → [batch, k]."""
    if is_full(indices, dense.shape[0]):
        return left @ dense.T
    if use_triton_kernel("sampled_dot", dense):
        from saelab.kernels import triton_ops

        return triton_ops.sampled_dot(indices, left, dense)
    columns, order = indices.sort(dim=-1, stable=True)  # CSR wants each row's columns sorted
    pattern = _row_pattern(columns, dense.shape[0], left.dtype)
    sampled = torch.sparse.sampled_addmm(pattern, left, dense.T, beta=0.0).values().view(indices.shape)
    return torch.empty_like(sampled).scatter_(-1, order, sampled)  # back to the callers' slot order


def _row_pattern(columns: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A [batch, n] CSR matrix of zeros at `columns` ([batch, k], sorted within each row)."""
    batch, k = columns.shape
    row_starts = torch.arange(0, batch * k + 1, k, device=columns.device)
    zeros = torch.zeros(batch * k, dtype=dtype, device=columns.device)
    return torch.sparse_csr_tensor(row_starts, columns.reshape(-1), zeros, (batch, n), check_invariants=False)


def _csr_by_latent(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """The transpose of the rows, [n, batch] in CSR: faster to multiply than the rows' CSR transposed."""
    batch, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    row_starts = torch.zeros(n + 1, dtype=torch.long, device=indices.device)
    row_starts[1:] = torch.bincount(flat, minlength=n).cumsum(0)
    return torch.sparse_csr_tensor(
        row_starts, order // k, values.reshape(-1)[order], (n, batch), check_invariants=False
    )
