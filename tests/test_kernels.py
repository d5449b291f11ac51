"""saelab.kernels against their dense references (saelab/kernels/reference.py) on random inputs.

Tolerances are relative to the largest reference entry: float64 < 1e-6, float32 < 1e-4.
The Triton kernels run under TRITON_INTERPRET=1 on the CPU (small sizes), and natively on a GPU; where
a GPU is present, the tests marked with DEVICES also run there (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saelab.kernels import (
    AboveThreshold,
    BatchTopK,
    RowTopK,
    row_constraints,
    selection,
    sparse_decode,
    sparse_encode,
    sparse_ops,
)
from saelab.kernels import reference as ref
from saelab.kernels.backend import COMPILED_MIN_ENTRIES, NUMBA_ENV_VAR, numba_available, triton_available, use_compiled
from saelab.kernels.selection import COMPILED_GROUP, GROUP, SAMPLE_STRIDE, largest_relu, row_topk

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
# (batch, d, n, k, tile): k = 1, k = n, a batch of 1, tiles that do not divide n; n 512: the compiled top-k.
SHAPES = [
    (37, 24, 300, 5, None),
    (37, 24, 300, 5, 64),
    (1, 16, 50, 1, 7),
    (9, 8, 40, 40, 16),
    (64, 33, 129, 8, 128),
    (29, 20, 512, 7, None),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["compiled", "torch"])
def cpu_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CPU kernels compiled with numba (`compiled_*.py`), or as torch (`SAELAB_NUMBA=0`, as where numba
    is missing): each route must equal the references."""
    if request.param == "torch":
        monkeypatch.setenv(NUMBA_ENV_VAR, "0")
    else:
        need_numba()
        monkeypatch.setenv(NUMBA_ENV_VAR, "1")  # whatever the size (small ones run as torch by default)
    return request.param


def need_numba() -> None:
    """numba is a dependency, so CI has it and a missing one fails; the lent GPU machine (gpu_check.sh) carries
    no numba, and there the compiled CPU route is skipped (CI tests it)."""
    if not numba_available():
        if torch.cuda.is_available():
            pytest.skip("numba is not installed on this GPU machine (benchmarks/gpu_check.sh); CI tests the CPU route")
        pytest.fail("numba is a dependency: the compiled CPU route must be tested")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def random_sae(
    batch: int, d: int, n: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "x": torch.randn(batch, d, generator=gen, dtype=dtype),
        "W_enc": torch.randn(d, n, generator=gen, dtype=dtype) / d**0.5,
        "b_enc": torch.randn(n, generator=gen, dtype=dtype) * 0.1,
        "b_dec": torch.randn(d, generator=gen, dtype=dtype) * 0.1,
        "W_dec": torch.randn(n, d, generator=gen, dtype=dtype) / d**0.5,
    }
    return {name: t.to(device).requires_grad_() for name, t in tensors.items()}


def kernel_loss(p: dict[str, torch.Tensor], rule: object, tile: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss through sparse_encode → relu → sparse_decode with a random linear read-out."""
    encoded = sparse_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], [rule], tile)
    out = sparse_decode(encoded.indices[0], encoded.values[0].relu(), p["W_dec"])
    readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    return encoded.indices[0], (out * readout).sum() + (out**2).sum()


def reference_loss(p: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices, values = ref.dense_topk_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], k)
    out = ref.dense_decode(indices, values.relu(), p["W_dec"])
    readout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    return indices, (out * readout).sum() + (out**2).sum()


def assert_grads_match(p: dict[str, torch.Tensor], loss: torch.Tensor, want_loss: torch.Tensor, dtype) -> None:
    names = list(p)
    got = torch.autograd.grad(loss, [p[n] for n in names])
    want = torch.autograd.grad(want_loss, [p[n] for n in names])
    assert relative_error(loss.detach(), want_loss.detach()) < TOLERANCE[dtype]
    for name, g, w in zip(names, got, want, strict=True):
        assert w.abs().max() > 0, f"∂/∂{name} is zero in the reference: the test would be vacuous"
        assert relative_error(g, w) < TOLERANCE[dtype], name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-n{}-k{}-tile{}".format(*s))
def test_topk_encode_and_decode_equal_the_dense_reference(shape, dtype, device, cpu_route):
    batch, d, n, k, tile = shape
    p = random_sae(batch, d, n, dtype, device=device)
    indices, loss = kernel_loss(p, RowTopK(k), tile)
    want_indices, want_loss = reference_loss(p, k)
    assert torch.equal(indices.sort(-1).values, want_indices.sort(-1).values), "same latents as torch.topk"
    assert_grads_match(p, loss, want_loss, dtype)


def check_products(indices: torch.Tensor, k: int, n: int, dtype: torch.dtype, seed: int) -> None:
    """Every sparse product (and `latent_sums`, `gather_latents`) of `indices` [batch, k] over n latents on random
    inputs (on `indices`'s device) against its dense definition."""
    gen = torch.Generator().manual_seed(seed)
    batch, d = indices.shape[0], 11
    values, left = torch.randn(batch, k, generator=gen, dtype=dtype), torch.randn(batch, d, generator=gen, dtype=dtype)
    dense_n, dense_b = torch.randn(n, d, generator=gen, dtype=dtype), torch.randn(batch, d, generator=gen, dtype=dtype)
    values, left, dense_n, dense_b = (t.to(indices.device) for t in (values, left, dense_n, dense_b))
    checks = [
        (sparse_ops.rows_matmul(indices, values, dense_n), ref.rows_matmul(indices, values, dense_n)),
        (
            sparse_ops.rows_transpose_matmul(indices, values, dense_b, n),
            ref.rows_transpose_matmul(indices, values, dense_b, n),
        ),
        (
            sparse_ops.rows_transpose_matmul(indices, values, dense_b, n, transposed=True),
            ref.rows_transpose_matmul(indices, values, dense_b, n).T,
        ),
        (sparse_ops.sampled_dot(indices, left, dense_n), ref.sampled_dot(indices, left, dense_n)),
        (sparse_ops.latent_sums(indices, values, n), ref.dense_rows(indices, values, n).sum(0)),
        (sparse_ops.gather_latents(dense_n[:, 0], indices), dense_n[:, 0][indices]),
    ]
    for got, want in checks:
        assert got.dtype == dtype and got.shape == want.shape
        assert relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_products_equal_their_dense_definitions_with_duplicate_indices(dtype, device, cpu_route):
    batch, n, k = 17, 23, 9
    indices = torch.randint(0, n, (batch, k), generator=torch.Generator().manual_seed(3))
    indices[:, 1] = indices[:, 0]  # a latent listed twice in a row adds up
    check_products(indices.to(device), k, n, dtype, seed=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rows_are_multiplied_densely_and_equal_their_dense_definitions(dtype, device, cpu_route):
    """Rows that hold every latent in order (what a mostly-passing selection returns) take the dense path."""
    batch, n = 13, 29
    indices = sparse_ops.full_rows(batch, n, torch.device(device))
    assert sparse_ops.is_full(indices, n) and not sparse_ops.is_full(indices.contiguous(), n)
    check_products(indices, n, n, dtype, seed=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [None, 10])
def test_a_mostly_passing_threshold_rule_returns_full_rows_equal_to_its_sparse_result(tile, device, monkeypatch):
    u = torch.randn(21, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    results = {}
    for fraction in (1.0, 0.0):  # never dense, always dense
        monkeypatch.setattr(selection, "DENSE_FRACTION", fraction)
        rule = AboveThreshold(-0.3)
        for start in range(0, 40, tile or 40):
            rule.update(u[:, start : start + (tile or 40)], start)
        results[fraction] = rule.result()
    assert sparse_ops.is_full(results[0.0].indices, 40) and not sparse_ops.is_full(results[1.0].indices, 40)
    for got in results.values():
        torch.testing.assert_close(ref.dense_rows(got.indices, got.pre_activations * got.valid, 40), u * (u > -0.3))


def test_gradient_score_hook_selects_by_score_and_passes_u_on():
    """The selection hook: rank by a score that differs from u; the values stay u at the chosen latents."""
    p = random_sae(21, 12, 90, torch.float64)
    weight = torch.rand(21, 90, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3

    def score(pre: torch.Tensor, start: int) -> torch.Tensor:
        return pre.relu() * weight[:, start : start + pre.shape[1]]

    encoded = sparse_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], [RowTopK(6, score=score)], tile=32)
    u = (p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    want = (u.relu() * weight).topk(6, dim=-1).indices
    assert torch.equal(encoded.indices[0].sort(-1).values, want.sort(-1).values)
    assert not torch.equal(want.sort(-1).values, u.topk(6, dim=-1).indices.sort(-1).values), "the score mattered"
    torch.testing.assert_close(encoded.values[0], u.gather(-1, encoded.indices[0]))


def test_auxk_rule_picks_only_allowed_latents_and_pads_when_too_few():
    p = random_sae(13, 10, 60, torch.float64)
    u = ((p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).detach()
    for n_allowed in (30, 3):
        allowed = torch.zeros(60, dtype=torch.bool)
        allowed[torch.randperm(60, generator=torch.Generator().manual_seed(n_allowed))[:n_allowed]] = True
        rule = RowTopK(5, allowed=allowed)
        for start in range(0, 60, 16):
            rule.update(u[:, start : start + 16], start)
        got = rule.result()
        want = u.masked_fill(~allowed, -torch.inf).topk(min(5, n_allowed), dim=-1)
        real = got.indices[got.valid].view(13, -1) if got.valid is not None else got.indices
        assert torch.equal(real.sort(-1).values, want.indices.sort(-1).values)
        assert (got.pre_activations[~got.valid] == 0).all() if got.valid is not None else n_allowed >= 5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [None, 17])
def test_batch_topk_and_threshold_rules_equal_dense_selection(tile, device):
    p = random_sae(19, 10, 70, torch.float64, device=device)
    u = ((p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).detach()
    threshold = torch.rand(70, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device) * 0.3
    flat = u.relu().flatten()
    batch_dense = torch.zeros_like(flat).scatter(0, flat.topk(19 * 4).indices, flat.topk(19 * 4).values).view_as(u)
    for rule, want in ((BatchTopK(4), batch_dense), (AboveThreshold(threshold), u * (u > threshold))):
        for start in range(0, 70, tile or 70):
            rule.update(u[:, start : start + (tile or 70)], start)
        got = rule.result()
        dense = ref.dense_rows(got.indices, got.pre_activations, 70)
        torch.testing.assert_close(dense, want)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_rules_give_no_gradient_to_padded_slots(device):
    """GBA's ReLU through the kernels: gradients equal the dense ReLU SAE's."""
    p = random_sae(15, 12, 80, torch.float64, device=device)
    encoded = sparse_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], [AboveThreshold(0.0)], tile=30)
    loss = (sparse_decode(encoded.indices[0], encoded.values[0].relu(), p["W_dec"]) ** 2).sum()
    u = (p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    want_loss = ((u.relu() @ p["W_dec"]) ** 2).sum()
    assert_grads_match(p, loss, want_loss, torch.float64)


def test_bf16_product_changes_only_the_choice_and_keeps_float32_values():
    p = random_sae(256, 64, 512, torch.float32, seed=4)
    exact = sparse_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], [RowTopK(16)])
    bf16 = sparse_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], [RowTopK(16)], matmul_dtype=torch.bfloat16)
    u = ((p["x"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).detach()
    torch.testing.assert_close(bf16.values[0].detach(), u.gather(-1, bf16.indices[0]))
    same = (exact.indices[0].sort(-1).values == bf16.indices[0].sort(-1).values).float().mean()
    assert 0.9 < same < 1.0, f"bf16 rounding should move a few boundary choices, not most ({same:.3f} agree)"


# ---- Triton: interpreted on the CPU, native on a GPU ------------------------------------------------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_ops(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not installed (it is in the test extra on Linux x86-64)")
    assert TRITON_DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets it on CPU"
    monkeypatch.setenv("SAELAB_TRITON", "1")
    return importlib.import_module("saelab.kernels.triton_ops")


@pytest.mark.parametrize("pairs_per_program", [2, 64])  # 2: latents spread over several programs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_products_equal_their_dense_definitions(triton_ops, dtype, pairs_per_program, monkeypatch):
    monkeypatch.setattr(triton_ops, "PAIRS_PER_PROGRAM", pairs_per_program)
    empty = torch.empty  # outputs start as NaNs, not as whatever memory held: every row must be written
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(torch.nan))
    gen = torch.Generator().manual_seed(7)
    batch, d, n, k = 5, 70, 19, 6  # d not a multiple of the block; a duplicate latent per row
    indices = torch.randint(0, n, (batch, k), generator=gen)
    indices[:, 1] = indices[:, 0]
    indices[:, 2] = 3  # latent 3 fires on every token: 5 pairs, more than 2 per program
    values, left = torch.randn(batch, k, generator=gen, dtype=dtype), torch.randn(batch, d, generator=gen, dtype=dtype)
    dense_n, dense_b = torch.randn(n, d, generator=gen, dtype=dtype), torch.randn(batch, d, generator=gen, dtype=dtype)
    on = [t.to(TRITON_DEVICE) for t in (indices, values, left, dense_n, dense_b)]
    pairs = [
        (triton_ops.rows_matmul(on[0], on[1], on[3]), ref.rows_matmul(indices, values, dense_n)),
        (
            triton_ops.rows_transpose_matmul(on[0], on[1], on[4], n),
            ref.rows_transpose_matmul(indices, values, dense_b, n),
        ),
        (triton_ops.sampled_dot(on[0], on[2], on[3]), ref.sampled_dot(indices, left, dense_n)),
    ]
    for got, want in pairs:
        assert relative_error(got.cpu(), want) < TOLERANCE[dtype]


@pytest.mark.parametrize("layout", ["row", "column"])  # W_enc's layout on the CPU, on CUDA
def test_triton_path_trains_like_the_reference(triton_ops, layout):
    """sparse_encode/sparse_decode dispatch to Triton when it is on; gradients still equal the reference."""
    p = {
        name: t.detach().to(TRITON_DEVICE).requires_grad_() for name, t in random_sae(6, 20, 40, torch.float64).items()
    }
    if layout == "column":
        p["W_enc"] = p["W_enc"].detach().T.contiguous().T.requires_grad_()
    _, loss = kernel_loss(p, RowTopK(3), tile=16)
    cpu = {name: t.detach().cpu().requires_grad_() for name, t in p.items()}
    _, want_loss = reference_loss(cpu, 3)
    got = torch.autograd.grad(loss, list(p.values()))
    want = torch.autograd.grad(want_loss, list(cpu.values()))
    for g, w in zip(got, want, strict=True):
        assert relative_error(g.cpu(), w) < 1e-6


# The 32-bit-key (low precision) path: bf16 on a GPU; fp16 in the interpreter, whose bf16 dot is wrong (Triton 3.9).
LOW_PRECISION = torch.bfloat16 if TRITON_DEVICE == "cuda" else torch.float16


@pytest.fixture
def triton_topk(triton_ops, monkeypatch):
    module = importlib.import_module("saelab.kernels.triton_topk")
    if not module.available():
        pytest.skip("this Triton has no tl.topk (3.4 and later have it)")
    if TRITON_DEVICE == "cpu":  # small blocks keep the interpreter to seconds
        for name, size in (("BLOCK_M", 16), ("BLOCK_N", 32), ("BLOCK_D", 16)):
            monkeypatch.setattr(module, name, size)
    return module


# (batch, d, n, k, product dtype, programs, W_enc layout): 1 program walks every tile of its rows (the running
# merge); 512 gives each tile its own span (the final top-k over the spans); k = n with K = 64 > n; k = 1;
# W_enc row-major (the CPU's layout) or column-major (CUDA's).
FUSED_CASES = [
    (37, 24, 300, 5, torch.float32, 1, "row"),
    (37, 24, 300, 5, LOW_PRECISION, 512, "column"),
    (16, 16, 96, 32, LOW_PRECISION, 1, "row"),
    (9, 8, 40, 40, torch.float32, 512, "column"),
    (9, 8, 40, 40, LOW_PRECISION, 1, "column"),
    (5, 16, 50, 1, torch.float32, 1, "row"),
    (5, 16, 50, 1, LOW_PRECISION, 512, "row"),
]


@pytest.mark.parametrize("batch,d,n,k,dtype,programs,layout", FUSED_CASES)
def test_fused_topk_keeps_the_k_largest_pre_activations(
    triton_topk, monkeypatch, batch, d, n, k, dtype, programs, layout
):
    """Every kept u is at least every dropped u (within the key's precision), and the values are u's."""
    monkeypatch.setattr(triton_topk, "TARGET_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(batch + n + k)
    x, W = torch.randn(batch, d, generator=gen), torch.randn(d, n, generator=gen) / d**0.5
    bias = torch.randn(n, generator=gen) * 0.1
    on = [t.to(TRITON_DEVICE) for t in (x, W.T.contiguous().T if layout == "column" else W, bias)]
    values, indices = (t.cpu() for t in triton_topk.encode_topk(*on, k, dtype))
    u = x.to(dtype).double() @ W.to(dtype).double() + bias.double()  # the product of the rounded inputs
    # float32: 64-bit keys rank as float32 does; 32-bit keys hold a value to bf16's 8 bits
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    scale = float(u.abs().max())
    assert indices.shape == (batch, k) and values.dtype == torch.float32
    assert all(len(set(row)) == k for row in indices.tolist()), "a latent kept twice for one token"
    kept = torch.zeros_like(u, dtype=torch.bool).scatter_(-1, indices, True)
    lowest_kept = u.masked_fill(~kept, torch.inf).amin(-1)
    highest_dropped = u.masked_fill(kept, -torch.inf).amax(-1)
    assert bool((lowest_kept >= highest_dropped - tolerance * scale).all())
    assert relative_error(values.double(), u.gather(-1, indices)) < tolerance


def test_tiled_topk_runs_fused_on_triton_and_trains_like_the_reference(triton_topk, monkeypatch):
    """With a tile on a Triton device a plain top-k takes the fused kernel, and its gradients are the
    reference's; AuxK's second rule, and no tile, take the scan."""
    calls = []
    fused = triton_topk.encode_topk
    monkeypatch.setattr(triton_topk, "encode_topk", lambda *args: calls.append(args) or fused(*args))
    p = {
        name: t.detach().to(TRITON_DEVICE).requires_grad_() for name, t in random_sae(6, 20, 40, torch.float32).items()
    }
    _, loss = kernel_loss(p, RowTopK(3), tile=16)
    assert len(calls) == 1
    cpu = {name: t.detach().cpu().requires_grad_() for name, t in p.items()}
    _, want_loss = reference_loss(cpu, 3)
    got = torch.autograd.grad(loss, list(p.values()))
    want = torch.autograd.grad(want_loss, list(cpu.values()))
    for g, w in zip(got, want, strict=True):
        assert relative_error(g.cpu(), w) < TOLERANCE[torch.float32]
    with torch.no_grad():
        dead = torch.ones(40, dtype=torch.bool, device=TRITON_DEVICE)
        sparse_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], [RowTopK(3), RowTopK(4, allowed=dead)], 16)
        sparse_encode(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], [RowTopK(3)], None)
    assert len(calls) == 1


@pytest.mark.parametrize("block", [16, 1024])  # 16: a row in several blocks (d 70)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_row_constraints_equal_their_definitions(triton_ops, dtype, block, monkeypatch):
    """g_i − (g_i·w_i / ‖w_i‖²) w_i and w_i / ‖w_i‖ row by row; a zero row stays zero and its gradient whole."""
    triton_rows = importlib.import_module("saelab.kernels.triton_rows")
    monkeypatch.setattr(triton_rows, "BLOCK", block)
    spy = []
    monkeypatch.setattr(
        triton_rows, "normalize_rows_", lambda *a, f=triton_rows.normalize_rows_: spy.append(1) or f(*a)
    )
    gen = torch.Generator().manual_seed(11)
    weight, grad = torch.randn(9, 70, generator=gen, dtype=dtype) * 3, torch.randn(9, 70, generator=gen, dtype=dtype)
    weight[4] = 0
    squared = (weight * weight).sum(1, keepdim=True)
    want_grad = grad - torch.where(squared > 0, (grad * weight).sum(1, keepdim=True) / squared, 0) * weight
    want_weight = weight / squared.sqrt().clamp_min(1e-12)
    on_grad, on_weight = grad.to(TRITON_DEVICE), weight.to(TRITON_DEVICE)
    row_constraints.remove_parallel_(on_grad, on_weight)
    row_constraints.normalize_rows_(on_weight)
    assert spy, "the Triton kernel should have run"
    assert relative_error(on_grad.cpu(), want_grad) < TOLERANCE[dtype]
    assert relative_error(on_weight.cpu(), want_weight) < TOLERANCE[dtype]
    assert torch.equal(on_weight[4].cpu(), weight[4]) and torch.equal(on_grad[4].cpu(), grad[4])


# ---- memory: the tiled mode's peak allocation ------------------------------------------------------

PEAK_SCRIPT = """
import sys, torch
from saelab.kernels import RowTopK, sparse_encode
batch, d, n, k, tile = 1024, 64, 65536, 32, {tile}
x = torch.randn(batch, d); W = torch.randn(d, n); b = torch.zeros(n); c = torch.zeros(d)
sparse_encode(x[:2], W, b, c, [RowTopK(k)], tile or n)                # warm the allocator and the code paths
def resident_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
open("/proc/self/clear_refs", "w").write("5")                         # reset the peak (VmHWM) to now
before = resident_kib()
sparse_encode(x, W, b, c, [RowTopK(k)], tile)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print((peak - before) * 1024)
"""


def peak_bytes(tile: int | None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT.format(tile=tile))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_tiled_encode_stays_under_its_memory_bound():
    """batch 1024 × 65,536 latents: dense u alone is 256 MiB; tiles of 1024 must stay within O(batch·(k+tile))."""
    batch, k, tile = 1024, 32, 1024
    # O(batch · (k·GROUP + tile)): four float32 buffers of [batch, tile + k·GROUP] + 4 MiB slack (~28 MiB)
    bound = 4 * batch * (tile + k * GROUP) * 4 + (4 << 20)
    tiled, dense = peak_bytes(tile), peak_bytes(None)
    assert dense > 256 << 20, f"the dense mode should hold u [1024, 65536] (256 MiB); measured {dense >> 20} MiB"
    assert tiled < bound, f"tiled peak {tiled >> 20} MiB exceeds the bound {bound >> 20} MiB"


@pytest.mark.parametrize("n,k", [(9216, 32), (4608, 1), (160, 9), (100, 7), (64, 4), (48, 40), (640, 19)])
def test_row_topk_equals_torch_topk(n, k, cpu_route):
    """The grouped top-k, in torch or compiled, keeps exactly torch.topk's entries (random floats: no ties)."""
    scores = torch.randn(53, n, generator=torch.Generator().manual_seed(n + k))
    scores[:5] = scores[:5].abs() * -1  # rows where every score is negative
    values, indices = row_topk(scores, k)
    want = scores.topk(k, dim=-1)
    assert torch.equal(indices.sort(-1).values, want.indices.sort(-1).values)
    torch.testing.assert_close(values.sort(-1).values, want.values.sort(-1).values)


def test_compiled_row_topk_keeps_k_of_the_tied_largest_and_runs_where_it_should(monkeypatch):
    """Scores from {0, 1, 2}: many ties at the k-th value; the compiled route keeps k distinct latents whose
    scores are the k largest. And it is the route taken for CPU float32 rows of n = 32·m, m > k."""
    need_numba()
    from saelab.kernels import compiled_topk

    monkeypatch.setenv(NUMBA_ENV_VAR, "1")
    calls = []
    monkeypatch.setattr(compiled_topk, "row_topk", lambda *a, f=compiled_topk.row_topk: calls.append(1) or f(*a))
    scores = torch.randint(0, 3, (41, COMPILED_GROUP * 20), generator=torch.Generator().manual_seed(5)).float()
    values, indices = row_topk(scores, 19)
    assert calls, "the compiled route should have run"
    assert torch.equal(scores.gather(-1, indices), values)
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all(), "k distinct latents per row"
    assert torch.equal(values.sort(-1).values, scores.topk(19, dim=-1).values.sort(-1).values)


def test_cpu_kernels_run_compiled_where_it_pays_unless_told(monkeypatch):
    """Automatic: float32/float64 CPU operands of COMPILED_MIN_ENTRIES entries or more; SAELAB_NUMBA 1 / 0 decide."""
    need_numba()
    monkeypatch.delenv(NUMBA_ENV_VAR, raising=False)
    big = torch.empty((), dtype=torch.float32).expand(COMPILED_MIN_ENTRIES // 256, 256)
    assert use_compiled(big) and use_compiled(big.double()) and not use_compiled(big[:-1])
    assert not use_compiled(torch.empty((), dtype=torch.bfloat16).expand(big.shape)), "numba reads no bf16"
    monkeypatch.setenv(NUMBA_ENV_VAR, "1")
    assert use_compiled(torch.empty(3))
    monkeypatch.setenv(NUMBA_ENV_VAR, "0")
    assert not use_compiled(big)


def test_latent_order_is_recomputed_when_the_indices_change_in_place(monkeypatch):
    """The decoder's and encoder's backwards share the grouping of one step's indices (compiled route); indices
    changed in place (same memory, new version) must be grouped anew, or the product would use stale pairs."""
    need_numba()
    monkeypatch.setenv(NUMBA_ENV_VAR, "1")
    gen = torch.Generator().manual_seed(6)
    indices = torch.randint(0, 40, (12, 5), generator=gen)
    values, dense = torch.randn(12, 5, generator=gen), torch.randn(12, 7, generator=gen)
    first = sparse_ops.rows_transpose_matmul(indices, values, dense, 40)
    indices.copy_(torch.randint(0, 40, (12, 5), generator=gen))
    again = sparse_ops.rows_transpose_matmul(indices, values, dense, 40)
    want = ref.rows_transpose_matmul(indices, values, dense, 40)
    assert relative_error(again, want) < TOLERANCE[torch.float32] and not torch.allclose(first, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_row_constraints_equal_their_definitions(dtype, cpu_route):
    """g_i − (g_i·w_i / ‖w_i‖²) w_i (compiled with numba or three torch kernels); a zero row keeps its gradient."""
    gen = torch.Generator().manual_seed(12)
    weight, grad = torch.randn(70, 33, generator=gen, dtype=dtype) * 3, torch.randn(70, 33, generator=gen, dtype=dtype)
    weight[4] = 0
    squared = (weight * weight).sum(1, keepdim=True)
    want = grad - torch.where(squared > 0, (grad * weight).sum(1, keepdim=True) / squared, 0) * weight
    got = grad.clone()
    row_constraints.remove_parallel_(got, weight)
    assert relative_error(got, want) < TOLERANCE[dtype] and torch.equal(got[4], grad[4])


@pytest.mark.parametrize(
    "shift,k",
    [(0.0, 32), (-2.35, 32), (-3.0, 32), (0.0, 1), (0.0, 200)],
    ids=["typical", "threshold-not-positive", "fewer-positive-than-kept", "k1", "threshold-path-off"],
)
def test_largest_relu_equals_one_topk_over_the_batch(shift, k):
    """BatchTopK's sampled-threshold selection keeps exactly relu(u).flatten().topk's entries, including where
    too few entries clear the threshold (the fallback) or too few are positive at all (zeros kept)."""
    pre = torch.randn(128, 4096, generator=torch.Generator().manual_seed(k)) + shift
    n = k * len(pre)
    assert (n * SAMPLE_STRIDE * 4 <= pre.numel()) == (k <= 32)  # the sampled threshold is tried for k ≤ 32
    values, indices = largest_relu(pre, n)
    want = pre.relu().flatten().topk(n)
    positive = want.values > 0
    assert positive.any()
    kept = values > 0
    assert torch.equal(indices[kept].sort().values, want.indices[positive].sort().values)
    assert torch.equal(values.sort().values, want.values.sort().values)
