"""Whether this CPU multiplies bf16 matrices natively, or only emulates them.

A CPU with bf16 matrix instructions (AVX-512 BF16, AMX) runs a bf16 GEMM faster than float32; one without
them (AVX2 alone, as many AMD EPYC and older Xeon machines) converts in software, and a bf16
[4096, 576] @ [576, 9216] then took 52.6 s against 0.45 s in float32 (117×): `dtype: bfloat16` would make
training ~100× slower there. The capability torch reports (`torch.backends.cpu.get_cpu_capability`: AVX2,
AVX512…) does not say whether AVX-512 includes BF16, so a short timed probe decides, once per process.
"""

from __future__ import annotations

import functools
import time

import torch

# A probe product [PROBE_ROWS, PROBE_INNER] @ [PROBE_INNER, PROBE_COLUMNS]: ~1 ms in float32 on one core.
PROBE_ROWS, PROBE_INNER, PROBE_COLUMNS = 128, 256, 512
SLOW_RATIO = 2.0  # bf16 slower than float32 by more than this: no native bf16 matrix instructions


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here (`AVX2`, `AVX512`, …)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # an old torch, or a platform without the query
        return "unknown"


@functools.cache
def bf16_slowdown() -> float:
    """How many times longer a bf16 matrix product takes than the same float32 one on this CPU (the best of
    three runs each, after a warm-up)."""
    a = torch.randn(PROBE_ROWS, PROBE_INNER, generator=torch.Generator().manual_seed(0))
    b = torch.randn(PROBE_INNER, PROBE_COLUMNS, generator=torch.Generator().manual_seed(1))
    return _best_time(a.bfloat16(), b.bfloat16()) / _best_time(a, b)


def _best_time(a: torch.Tensor, b: torch.Tensor, runs: int = 3) -> float:
    a @ b  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return max(min(times), 1e-9)


def cpu_has_fast_bf16() -> bool:
    """Whether a bf16 product runs at least about as fast as float32 here (not SLOW_RATIO × slower)."""
    return bf16_slowdown() <= SLOW_RATIO


def slow_bf16_notice() -> str:
    """The one line that says bf16 was asked for on a CPU that lacks it, and what runs instead."""
    return (
        f"dtype: bfloat16 was asked for, but this CPU ({cpu_capability()}) has no bf16 matrix instructions: a bf16 "
        f"product took {bf16_slowdown():.0f}× as long as float32 here, so training runs in float32 "
        "(force_bf16: true trains in bf16 anyway)"
    )
