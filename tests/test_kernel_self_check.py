"""Triton kernels that check themselves (saelab/kernels/self_check.py). On the CPU, CUDA is simulated by letting
the automatic setting take the CPU for a Triton device, and the kernels run under TRITON_INTERPRET=1 (conftest);
on a GPU (benchmarks/gpu_check.sh) the same tests run natively on CUDA.

A kernel that fails to compile, or that returns a wrong result, prints one line and runs as torch from then on;
one that passes keeps the Triton path; the CPU path never runs a check."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from saelab.kernels import RowTopK, backend, row_constraints, self_check, sparse_decode, sparse_encode, sparse_ops
from saelab.kernels import reference as ref

KERNELS = list(self_check.DEFAULT_KERNELS)
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
FALLBACK = "falling back to torch; `SAELAB_TRITON=0` silences this"


@pytest.fixture
def simulated_cuda(monkeypatch):
    """The automatic setting with no verdict remembered; on the CPU, the CPU counted as a Triton device."""
    if not backend.triton_available():
        pytest.skip("triton is not installed (it is in the test extra on Linux x86-64)")
    assert DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets it on CPU"
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    if DEVICE.type == "cpu":
        monkeypatch.setattr(backend, "TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    self_check.forget()
    yield
    self_check.forget()


def module_of(kernel: str):
    return importlib.import_module("saelab.kernels." + ("triton_rows" if kernel.endswith("_") else "triton_ops"))


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 30, (12, 5), generator=gen)
    tensors = {
        "indices": indices,
        "values": torch.randn(12, 5, generator=gen),
        "rows_n": torch.randn(30, 20, generator=gen),
        "rows_batch": torch.randn(12, 20, generator=gen),
    }
    return {name: t.to(DEVICE) for name, t in tensors.items()}


def dispatched(kernel: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """`kernel` called the way training calls it: through the dispatching function of sparse_ops / row_constraints."""
    if kernel == "rows_matmul":
        return sparse_ops.rows_matmul(x["indices"], x["values"], x["rows_n"])
    if kernel == "rows_transpose_matmul":
        return sparse_ops.rows_transpose_matmul(x["indices"], x["values"], x["rows_batch"], 30)
    if kernel == "sampled_dot":
        return sparse_ops.sampled_dot(x["indices"], x["rows_batch"], x["rows_n"])
    weight = x["rows_n"].clone()
    if kernel == "remove_parallel_":
        grad = x["rows_n"].flip(0).contiguous()
        row_constraints.remove_parallel_(grad, weight)
        return grad
    row_constraints.normalize_rows_(weight)
    return weight


def torch_result(kernel: str, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv(backend.ENV_VAR, "0")
    want = dispatched(kernel, inputs())
    monkeypatch.delenv(backend.ENV_VAR)
    return want


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit on the CPU; on CUDA torch's own sparse products may sum in another order run to run."""
    return torch.equal(got, want) if DEVICE.type == "cpu" else torch.allclose(got, want, rtol=1e-6, atol=1e-6)


class CompilationError(Exception):
    """Shaped like Triton's: the source excerpt first, the cause last."""


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_kernel_that_fails_to_compile_says_so_in_one_line_and_runs_on_torch(
    simulated_cuda, kernel, monkeypatch, capsys
):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise CompilationError(
            "at 12:8:\n    acc += weight * tl.load(ptr)\n        ^\nValueError('unsupported ptr type')"
        )

    monkeypatch.setattr(module_of(kernel), kernel, broken)
    want = torch_result(kernel, monkeypatch)
    first, second = dispatched(kernel, inputs()), dispatched(kernel, inputs())
    assert same(first, want) and same(second, want)
    assert calls == [1], "only the self-check calls the broken kernel; every later call runs torch"
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"saelab: Triton kernel {kernel} failed its self-check on {DEVICE} (float32): CompilationError: at 12:8: … "
        f"ValueError('unsupported ptr type'); {FALLBACK}"
    ]


@pytest.mark.parametrize("kernel", ["rows_transpose_matmul", "normalize_rows_"])
def test_a_kernel_that_computes_wrongly_says_by_how_much_and_runs_on_torch(simulated_cuda, kernel, monkeypatch, capsys):
    real = getattr(module_of(kernel), kernel)
    calls = []

    def off_by_a_percent(*args):
        calls.append(1)
        out = real(*args)
        target = args[0] if out is None else out  # the row kernels work in place
        target.mul_(1.01)
        return out

    monkeypatch.setattr(module_of(kernel), kernel, off_by_a_percent)
    want = torch_result(kernel, monkeypatch)
    assert same(dispatched(kernel, inputs()), want)
    assert calls == [1]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"saelab: Triton kernel {kernel} failed its self-check on {DEVICE} (float32): ")
    assert "max relative difference 0.01 from its torch reference (tolerance 0.0001)" in line and line.endswith(
        FALLBACK
    )
    (result,) = self_check.results()
    assert not result.passed and result.kernel == kernel


def test_kernels_that_pass_their_self_check_keep_the_triton_path(simulated_cuda, monkeypatch, capsys):
    """A training step's kernels: each checked once, each then run as Triton, the result the reference's."""
    counted = {kernel: 0 for kernel in KERNELS}
    for kernel in KERNELS:
        module, real = module_of(kernel), getattr(module_of(kernel), kernel)
        monkeypatch.setattr(
            module, kernel, lambda *a, _k=kernel, _f=real: counted.__setitem__(_k, counted[_k] + 1) or _f(*a)
        )
    gen = torch.Generator().manual_seed(0)
    x, W_enc = torch.randn(10, 16, generator=gen).to(DEVICE), torch.randn(16, 40, generator=gen).to(DEVICE)
    b_enc, b_dec = torch.zeros(40, device=DEVICE), torch.zeros(16, device=DEVICE)
    W_dec = torch.randn(40, 16, generator=gen).to(DEVICE)
    for parameter in (W_enc, b_enc, b_dec, W_dec):
        parameter.requires_grad_()
    for _ in range(2):
        encoded = sparse_encode(x, W_enc, b_enc, b_dec, [RowTopK(4)])
        reconstruction = sparse_decode(encoded.indices[0], encoded.values[0].relu(), W_dec)
        reconstruction.square().sum().backward()
        with torch.no_grad():
            row_constraints.remove_parallel_(W_dec.grad, W_dec)
            row_constraints.normalize_rows_(W_dec)
    assert capsys.readouterr().err == ""
    assert sorted(r.kernel for r in self_check.results() if r.passed) == sorted(KERNELS)
    # each kernel: 1 self-check call, then its calls in two steps (rows_transpose_matmul twice per step: ∂W_enc, ∂W_dec)
    assert counted == {
        "rows_matmul": 3,
        "rows_transpose_matmul": 5,
        "sampled_dot": 3,
        "remove_parallel_": 3,
        "normalize_rows_": 3,
    }
    assert torch.allclose(W_dec.norm(dim=1), torch.ones(40, device=DEVICE))


def test_the_cpu_path_never_runs_a_check_and_forced_triton_skips_it(monkeypatch):
    if DEVICE.type == "cuda":
        pytest.skip("the CPU path's test")

    def no_check(*args):
        raise AssertionError("a self-check ran")

    monkeypatch.setattr(self_check, "passes", no_check)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    x = inputs()
    assert torch.allclose(
        dispatched("rows_matmul", x), ref.rows_matmul(x["indices"], x["values"], x["rows_n"]), atol=1e-5
    )
    dispatched("normalize_rows_", x)
    if backend.triton_available():
        monkeypatch.setenv(backend.ENV_VAR, "1")  # forced: the kernel tests measure the kernels themselves
        assert torch.allclose(
            dispatched("rows_matmul", x), ref.rows_matmul(x["indices"], x["values"], x["rows_n"]), atol=1e-5
        )
        assert backend.backend_choice("cpu").reason.startswith(f"{backend.ENV_VAR}=1 forces Triton")
