"""Plain dense definitions of every kernel: slow, obviously right, and what the tests hold the kernels to.

u = (x − b_dec) W_enc + b_enc                   [batch, n]   every pre-activation, materialised
z = the k largest of relu(u) per row (by score)  [batch, n]   zeros elsewhere
x̂ = z W_dec                                     [batch, d]
"""

from __future__ import annotations

import torch


def dense_rows(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Sparse rows (indices, values: [batch, k]) as a dense [batch, n] matrix (duplicates add up)."""
    return values.new_zeros(indices.shape[0], n).scatter_add(-1, indices, values)


def rows_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return dense_rows(indices, values, dense.shape[0]) @ dense


def rows_transpose_matmul(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, n: int) -> torch.Tensor:
    return dense_rows(indices, values, n).T @ dense


def sampled_dot(indices: torch.Tensor, left: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return (left @ dense.T).gather(-1, indices)


def dense_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    score: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the k largest relu(u) per row — or of the k largest `score` [batch, n] —
    with values = u at those indices (relu is the caller's); differentiable through torch autograd."""
    u = (x - b_dec) @ W_enc + b_enc
    ranking = u.relu() if score is None else score
    indices = ranking.detach().topk(k, dim=-1).indices
    return indices, u.gather(-1, indices)


def dense_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """x̂ = z W_dec with z the dense form of the rows; differentiable through torch autograd."""
    return dense_rows(indices, values, W_dec.shape[0]) @ W_dec


def remove_parallel(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g_i − (g_i·w_i / ‖w_i‖²) w_i per row (a zero row keeps its whole gradient); grad, weight: [n, d]."""
    squared = (weight * weight).sum(1, keepdim=True)
    return grad - torch.where(squared > 0, (grad * weight).sum(1, keepdim=True) / squared, 0) * weight


def normalize_rows(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """w_i / max(‖w_i‖, eps) per row; weight: [n, d]."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(eps)
