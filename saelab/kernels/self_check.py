"""Triton kernels that check themselves: the first call of each in a process runs it once on a small random
input against its torch reference, and a kernel that fails runs as torch from then on.

Why: the tests hold the Triton kernels to their references under `TRITON_INTERPRET=1` on the CPU, but a
GPU compiles them for real, with a Triton, a driver and a card the tests never saw. So in the automatic
setting (`backend.py`: CUDA with Triton installed) `use_triton_kernel` asks `passes(kernel, device,
dtype)` before each Triton call; the first time for a (kernel, device, dtype) it runs the kernel on a
fixed random input (float32: 80 tokens, k 4, 32 latents, d 48; one latent fires on every token, so the
load-balancing second launch of `rows_transpose_matmul` runs too) and compares it with `reference.py`:

    relative difference = max |triton − reference| / max |reference|  ≤ TOLERANCE[dtype]
                          (float64 1e-6, float32 1e-4, 16-bit 1e-2: the kernel tests' bounds)

A compile or launch error, or a larger difference, prints ONE line to stderr (which kernel, the error
or the difference, "falling back to torch; `SAELAB_TRITON=0` silences this") and the verdict is kept
for the rest of the process. The check costs a few milliseconds once per kernel on a GPU and nothing on
the CPU path, where no Triton kernel runs. `SAELAB_TRITON=1` forces Triton without checks (the kernel
tests and benchmarks must measure the kernels themselves). A CUDA error that corrupts the context (an
illegal address) cannot be recovered by falling back: torch fails next, with the same error.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saelab.kernels import reference as ref

# The Triton kernels that run by default on CUDA (the fused top-k of `triton_topk.py` runs only with an
# `encoder_tile`, and is not checked here): name → what it computes.
DEFAULT_KERNELS = {
    "rows_matmul": "sparse decode x̂ = Σ v·W_dec[i] and ∂L/∂x (triton_ops.py)",
    "rows_transpose_matmul": "∂W_enc and ∂W_dec over the kept pairs (triton_ops.py)",
    "sampled_dot": "∂L/∂values and the bf16 path's float32 values (triton_ops.py)",
    "remove_parallel_": "the decoder gradient's component along each row removed (triton_rows.py)",
    "normalize_rows_": "decoder rows renormalised (triton_rows.py)",
}
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
LOW_PRECISION_TOLERANCE = 1e-2
SHAPE = {"batch": 80, "k": 4, "n": 32, "d": 48}


@dataclass(frozen=True)
class CheckResult:
    kernel: str
    device: str
    dtype: torch.dtype
    passed: bool
    detail: str  # the relative difference, or the error


_results: dict[tuple[str, str, torch.dtype], CheckResult] = {}
_lock = threading.Lock()


def passes(kernel: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether Triton kernel `kernel` may run on `device` in `dtype`; checks it on the first call."""
    result = _results.get((kernel, str(device), dtype))
    return (result or check(kernel, device, dtype)).passed


def check(kernel: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> CheckResult:
    """The self-check's result for (kernel, device, dtype): run once per process, then remembered.
    A failure prints its one line when it is found."""
    key = (kernel, str(device), dtype)
    with _lock:
        if key not in _results:
            _results[key] = _run(kernel, torch.device(device), dtype)
            if not _results[key].passed:
                print(failure_line(_results[key]), file=sys.stderr, flush=True)
        return _results[key]


def results() -> list[CheckResult]:
    """Every self-check run in this process so far."""
    return list(_results.values())


def forget() -> None:
    """Forget every verdict, so that the next call checks again (tests; a process that swapped its Triton)."""
    with _lock:
        _results.clear()


def failure_line(result: CheckResult) -> str:
    where = f"{result.device} ({_dtype_name(result.dtype)})"
    return (
        f"saelab: Triton kernel {result.kernel} failed its self-check on {where}: {result.detail}; "
        "falling back to torch; `SAELAB_TRITON=0` silences this"
    )


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)


def _run(kernel: str, device: torch.device, dtype: torch.dtype) -> CheckResult:
    if kernel not in _CHECKS:
        raise KeyError(f"no self-check for kernel {kernel!r}; known: {', '.join(_CHECKS)}")
    try:
        with torch.no_grad():
            got, want = _CHECKS[kernel](device, dtype)
            difference = float((got.double().cpu() - want.double()).abs().max() / want.double().abs().max())
    except Exception as error:  # a compile or launch error is exactly what the check is for
        return CheckResult(kernel, str(device), dtype, False, _one_line(error))
    bound = tolerance(dtype)
    if not difference <= bound:  # NaN fails too
        detail = f"max relative difference {difference:.2g} from its torch reference (tolerance {bound:g})"
        return CheckResult(kernel, str(device), dtype, False, detail)
    return CheckResult(kernel, str(device), dtype, True, f"max relative difference {difference:.2g}")


def _one_line(error: Exception) -> str:
    """An exception as one line: its type, its message's first line and, for a long message such as a
    Triton compile error (source excerpt first, the cause last), its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += f" … {lines[-1]}"
    text = text if len(text) <= 300 else text[:299] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the checks: (device, dtype) → (the Triton result, the reference on the CPU) -------------------------


def _inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A fixed random input on the CPU: its own generator, so the caller's random state is untouched."""
    gen = torch.Generator().manual_seed(20240601)
    batch, k, n, d = SHAPE["batch"], SHAPE["k"], SHAPE["n"], SHAPE["d"]
    indices = torch.randint(0, n, (batch, k), generator=gen)
    indices[:, 0] = 3  # one latent on every token: more pairs than a program of rows_transpose_matmul sums
    return {
        "indices": indices,
        "values": torch.randn(batch, k, generator=gen).to(dtype),
        "rows_n": torch.randn(n, d, generator=gen).to(dtype),
        "rows_batch": torch.randn(batch, d, generator=gen).to(dtype),
        "grad": torch.randn(n, d, generator=gen).to(dtype),
    }


def _rows_matmul(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from saelab.kernels import triton_ops

    x = _inputs(dtype)
    got = triton_ops.rows_matmul(x["indices"].to(device), x["values"].to(device), x["rows_n"].to(device))
    return got, ref.rows_matmul(x["indices"], x["values"].double(), x["rows_n"].double())


def _rows_transpose_matmul(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from saelab.kernels import triton_ops

    x, n = _inputs(dtype), SHAPE["n"]
    on = [x[name].to(device) for name in ("indices", "values", "rows_batch")]
    got = triton_ops.rows_transpose_matmul(*on, n)
    return got, ref.rows_transpose_matmul(x["indices"], x["values"].double(), x["rows_batch"].double(), n)


def _sampled_dot(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from saelab.kernels import triton_ops

    x = _inputs(dtype)
    got = triton_ops.sampled_dot(x["indices"].to(device), x["rows_batch"].to(device), x["rows_n"].to(device))
    return got, ref.sampled_dot(x["indices"], x["rows_batch"].double(), x["rows_n"].double())


def _remove_parallel(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from saelab.kernels import triton_rows

    x = _inputs(dtype)
    grad, weight = x["grad"].to(device), x["rows_n"].to(device)
    triton_rows.remove_parallel_(grad, weight, 1e-24)
    return grad, ref.remove_parallel(x["grad"].double(), x["rows_n"].double())


def _normalize_rows(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from saelab.kernels import triton_rows

    x = _inputs(dtype)
    weight = x["rows_n"].to(device) * 3
    triton_rows.normalize_rows_(weight, 1e-12)
    return weight, ref.normalize_rows(x["rows_n"].double() * 3)


_CHECKS: dict[str, Callable[[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]]] = {
    "rows_matmul": _rows_matmul,
    "rows_transpose_matmul": _rows_transpose_matmul,
    "sampled_dot": _sampled_dot,
    "remove_parallel_": _remove_parallel,
    "normalize_rows_": _normalize_rows,
}
