"""The encoder product fused with the per-token top-k (Triton): u = left · W_enc + b_enc is never stored.

One program owns a block of BLOCK_M tokens and a span of latents. It computes u one [BLOCK_M,
BLOCK_N] tile at a time (`tl.dot`, float32 accumulation) and keeps a running top-K per token in
registers: each tile's top-K is merged with the running one by one more top-K over the 2K of them.
Each program writes its K candidates per token, and one `torch.topk` over the spans' candidates
([batch, spans · K], a few hundred per token) picks the k. Memory: O(batch · spans · K) instead of the
[batch, n] pre-activations (1 GiB in bf16 at batch 4096 × 131,072 latents).

A (value, latent) pair is ranked as one integer key, so that Triton's bitonic `tl.topk` carries the
latent along: the float's bits made order-preserving as an integer (flip the magnitude bits of a
negative float) in the high half, the latent's offset in its span in the low half.
- float32 product: 64-bit keys, so the ranking is the float32 one (`sparse_encode`'s float32 path);
- bf16 product: 32-bit keys, the value cut to its top 16 bits (bf16's precision, which is what the
  unfused bf16 path ranks too) and a 16-bit offset (spans ≤ 65,536 latents). Half the sorting work.
Ties (equal keys' values) go to the larger offset; `torch.topk` breaks them its own way.

W_enc is read in its own dtype and layout and cast in registers: no bf16 copy of it per step.
Needs a Triton with `tl.topk` (3.4 and later); `available()` says whether this one has it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 64  # tokens per program
BLOCK_N = 128  # latents per tile (at least K)
BLOCK_D = 64  # the reduction's step over d_in
NUM_WARPS = 8  # a [64, 128] tile of 64-bit keys and its sorting network over 256 threads (untuned: no GPU yet)
TARGET_PROGRAMS = 512  # enough programs to fill an H100/H200 (132 SMs) several times over
MAX_K = 128  # larger k: the unfused path (a running top-K that wide would not fit in registers)
SPAN_LIMIT_32 = 1 << 16  # a 32-bit key's offset field


def available() -> bool:
    return hasattr(tl, "topk")


def supports(k: int, dtype: torch.dtype) -> bool:
    """Whether the fused kernel runs this top-k in this product dtype (float64 has no `tl.dot`)."""
    return available() and 0 < k <= MAX_K and dtype in (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _pack(values, offsets, KEY64: tl.constexpr):
    """(float32 value, int32 offset) → an integer key that orders as the value, then the offset."""
    bits = values.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    if KEY64:
        return (ordered.to(tl.int64) << 32) | offsets.to(tl.int64)
    return ((ordered >> 16) << 16) | offsets


@triton.jit
def _unpack(keys, KEY64: tl.constexpr):
    """The inverse of `_pack` (a 32-bit key's value comes back with bf16's precision)."""
    if KEY64:
        ordered = (keys >> 32).to(tl.int32)
        bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
        offsets = (keys & 0xFFFFFFFF).to(tl.int32)
    else:  # the cut bits stay 0 in the float (flipping them too would turn −inf into a NaN)
        ordered = (keys >> 16) << 16
        bits = ordered ^ ((ordered >> 31) & 0x7FFF0000)
        offsets = keys & 0xFFFF
    return bits.to(tl.float32, bitcast=True), offsets


@triton.jit
def _tile_product(
    left_ptr,
    weight_ptr,
    rows,
    row_inside,
    cols,
    col_inside,
    d,
    stride_weight_d,
    stride_weight_n,
    DOT_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """left[rows] · W_enc[:, cols] as a [BLOCK_M, BLOCK_N] float32 tile (masked rows and columns hold 0)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, d, BLOCK_D):
        ks = step + tl.arange(0, BLOCK_D)
        k_inside = ks < d
        a = tl.load(left_ptr + rows[:, None] * d + ks[None, :], mask=row_inside[:, None] & k_inside[None, :], other=0.0)
        w_offsets = ks[:, None].to(tl.int64) * stride_weight_d + cols[None, :] * stride_weight_n  # d·n may pass 2³¹
        w = tl.load(weight_ptr + w_offsets, mask=k_inside[:, None] & col_inside[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
    return acc


@triton.jit
def _encode_topk_kernel(
    left_ptr,
    weight_ptr,
    bias_ptr,
    values_ptr,
    latents_ptr,
    batch,
    d,
    n,
    span,
    stride_weight_d,
    stride_weight_n,
    spans,
    K: tl.constexpr,
    KEY64: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_inside = rows < batch
    begin = tl.program_id(1) * span
    end = tl.minimum(begin + span, n)
    slots = tl.arange(0, K)
    best = _pack(tl.full([BLOCK_M, K], float("-inf"), tl.float32), tl.zeros([BLOCK_M, K], tl.int32), KEY64)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_inside = cols < end
        acc = _tile_product(
            left_ptr,
            weight_ptr,
            rows,
            row_inside,
            cols,
            col_inside,
            d,
            stride_weight_d,
            stride_weight_n,
            DOT_DTYPE,
            IEEE,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        acc += tl.load(bias_ptr + cols, mask=col_inside, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(col_inside[None, :], acc, float("-inf"))
        tile_best = tl.topk(_pack(acc, (cols - begin)[None, :] + tl.zeros([BLOCK_M, BLOCK_N], tl.int32), KEY64), K)
        best = tl.topk(tl.reshape(tl.join(best, tile_best), [BLOCK_M, 2 * K]), K)
    values, offsets = _unpack(best, KEY64)
    out = rows[:, None] * (spans * K) + tl.program_id(1) * K + slots[None, :]
    tl.store(values_ptr + out, values, mask=row_inside[:, None])
    tl.store(latents_ptr + out, begin + offsets, mask=row_inside[:, None])


def encode_topk(
    left: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [batch, k] float32, indices [batch, k] long) of the k largest u = left · W_enc + b_enc per row,
    with the product in `dtype` (`supports(k, dtype)` must hold); left: [batch, d], W_enc: [d, n]."""
    batch, d = left.shape
    n = W_enc.shape[1]
    K = max(triton.next_power_of_2(k), 2)  # tl.topk of 1 fails to compile in some Triton 3.x
    block_n = max(BLOCK_N, K)
    key64 = dtype == torch.float32
    spans, span = _spans(batch, n, block_n, key64)
    values = torch.empty(batch, spans * K, device=left.device, dtype=torch.float32)
    latents = torch.empty(batch, spans * K, device=left.device, dtype=torch.int32)
    grid = (triton.cdiv(batch, BLOCK_M), spans)
    _encode_topk_kernel[grid](
        left.contiguous(),
        W_enc,
        b_enc,
        values,
        latents,
        batch,
        d,
        n,
        span,
        W_enc.stride(0),
        W_enc.stride(1),
        spans,
        K,
        key64,
        _triton_dtype(dtype),
        key64,  # float32: IEEE products, not TF32, so the choice is float32's
        BLOCK_M,
        block_n,
        BLOCK_D,
        num_warps=NUM_WARPS,
    )
    top = values.topk(min(k, n), dim=-1, sorted=False)
    return top.values, latents.gather(-1, top.indices).long()


def _spans(batch: int, n: int, block_n: int, key64: bool) -> tuple[int, int]:
    """(number of spans, latents per span): a whole number of tiles each, enough programs to fill the GPU,
    and no span wider than a 32-bit key's offset field can count."""
    tiles = triton.cdiv(n, block_n)
    spans = min(tiles, max(1, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(batch, BLOCK_M))))
    if not key64:
        spans = max(spans, triton.cdiv(tiles, SPAN_LIMIT_32 // block_n))
    span = triton.cdiv(tiles, spans) * block_n
    return triton.cdiv(n, span), span


def _triton_dtype(dtype: torch.dtype) -> tl.dtype:
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
