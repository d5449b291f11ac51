"""One full TopK training step — forward, backward, Adam, decoder renorm — for saelab, sparsify and SAELens.

    make bench-env                                  # once: .venv-bench with sparsify and SAELens
    .venv-bench/bin/python benchmarks/training_step.py    # CPU: d_model 576, k 32, batch 4096, n ∈ {4608, 9216, 36864}
    python benchmarks/training_step.py --device cuda      # a GPU: the four shapes of CUDA_SHAPES
    python benchmarks/training_step.py --device cuda --profile saelab-bf16 --shapes 4096,131072,64,4096  # profile
    python benchmarks/training_step.py --breakdown        # saelab's step by phase (encoder GEMM, top-k, …)

Each implementation runs in its own process (so its peak memory is its own). In that process the
step and its floors are timed in turn, so the ratios are measured under the same machine load.

On the CPU (peak memory: the process's peak resident set over two full steps, less what it held
after a warm-up step on 64 rows):
- floor: one dense encoder matmul [batch, d] × [d, n] as one writes it, `x @ W` (a fresh output);
- GEMM: the same product into a warm, reused output: the arithmetic alone. A fresh 150 MB output
  costs ~15 % more on the CPU in page faults; saelab reuses its buffer, so it is held to both.

On a GPU (CUDA events, the median of `--rounds` steps; peak memory: `torch.cuda.max_memory_allocated`
over two steps, everything the process holds included):
- bf16 GEMM and fp32 GEMM: the encoder product in each dtype, into a warm output;
- Adam: one fused Adam step over parameters of the SAE's shapes (28 bytes of memory traffic each);
- floor = bf16 GEMM + Adam, what no implementation of the step can go below.

All get the same fused Adam, and no latent is dead (AuxK off), as at the start of training.
sparsify runs its forward under bf16 autocast on CUDA (its own choice); "saelab" runs the encoder
product in float32, "saelab-bf16" in bf16 (float32 master weights in both). The "-tiled" rows are
saelab's memory-bounded mode (`encoder_tile`); on CUDA it is the fused product + top-k kernel
(saelab/kernels/triton_topk.py), which never stores the [batch, n] pre-activations.
"saelab-bf16-rowmajor" stores W_enc row-major, as on the CPU, instead of CUDA's column-major layout
(`saelab.sae.base.encoder_layout`): the A/B that checks that choice.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from saelab.kernels.cpu_bf16 import bf16_slowdown, cpu_capability, cpu_has_fast_bf16


@dataclass(frozen=True)
class Shape:
    d_model: int
    n: int
    k: int
    batch: int

    def __str__(self) -> str:
        return f"{self.d_model}×{self.n}, k {self.k}, batch {self.batch}"


CPU_SHAPES = tuple(Shape(576, n, 32, 4096) for n in (4608, 9216, 36864))
CUDA_SHAPES = (
    Shape(576, 9216, 32, 4096),
    Shape(576, 36864, 32, 4096),
    Shape(2304, 65536, 64, 8192),
    Shape(4096, 131072, 64, 4096),
)
TILE = 4096  # saelab's memory-bounded mode: latents per tile
IMPLEMENTATIONS = (
    "saelab",
    "saelab-tiled",
    "saelab-bf16",
    "saelab-bf16-tiled",
    "saelab-bf16-rowmajor",
    "sparsify",
    "sae-lens",
)
DEFAULTS = {
    "cpu": ("saelab", "saelab-tiled", "saelab-bf16", "sparsify", "sae-lens"),
    "cuda": ("saelab", "saelab-bf16", "saelab-bf16-tiled", "saelab-bf16-rowmajor", "sparsify", "sae-lens"),
}
Step = Callable[[torch.Tensor], None]
SLOW_BF16 = "skipped: bf16 is emulated on this CPU, and saelab trains such runs in float32"


def saelab_step(
    shape: Shape,
    device: str,
    tile: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    row_major: bool = False,
) -> Step:
    """`row_major`: W_enc stored row-major whatever the device (saelab stores it column-major on CUDA)."""
    from saelab.kernels.backend import NUMBA_ENV_VAR
    from saelab.sae import SAEConfig, build_sae
    from saelab.train.dead_latents import DeadLatentTracker
    from saelab.train.step import KernelOptions, train_step

    config = SAEConfig(d_in=shape.d_model, d_sae=shape.n, k=shape.k)
    sae = build_sae(config, generator=torch.Generator().manual_seed(0)).to(device)
    if row_major:
        sae.W_enc.data = sae.W_enc.data.contiguous()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    tracker = DeadLatentTracker(shape.n, dead_tokens=10**15, device=device)
    kernels = KernelOptions(tile, matmul_dtype)

    def step(x: torch.Tensor) -> None:
        train_step(sae, optimizer, x, None, tracker, 1 / 32, shape.d_model // 2, kernels)

    if device == "cpu":  # numba's import and its kernels' load, which a run pays once, before memory is measured:
        with mock.patch.dict(os.environ, {NUMBA_ENV_VAR: "1"}):  # compiled even on a warm-up's few rows
            step(torch.randn(64, shape.d_model))
    return step


def sparsify_step(shape: Shape, device: str) -> Step:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(shape.d_model, SparseCoderConfig(num_latents=shape.n, k=shape.k), device=device)
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-4, fused=True)
    no_dead = torch.zeros(shape.n, dtype=torch.bool, device=device)

    def step(x: torch.Tensor) -> None:
        out = coder(x, dead_mask=no_dead)
        optimizer.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        coder.set_decoder_norm_to_unit_norm()

    return step


def sae_lens_step(shape: Shape, device: str) -> Step:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    config = TopKTrainingSAEConfig(d_in=shape.d_model, d_sae=shape.n, k=shape.k, dtype="float32", device=device)
    sae = TopKTrainingSAE(config)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    no_dead = torch.zeros(shape.n, dtype=torch.bool, device=device)

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(TrainStepInput(x, {}, no_dead, 0, False))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        with torch.no_grad():  # SAELens's TopK rescales by the decoder norm; renormalise as the others do
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)

    return step


BUILDERS: dict[str, Callable[[Shape, str], Step]] = {
    "saelab": saelab_step,
    "saelab-tiled": lambda shape, device: saelab_step(shape, device, tile=TILE),
    "saelab-bf16": lambda shape, device: saelab_step(shape, device, matmul_dtype=torch.bfloat16),
    "saelab-bf16-tiled": lambda shape, device: saelab_step(shape, device, TILE, torch.bfloat16),
    "saelab-bf16-rowmajor": lambda shape, device: saelab_step(shape, device, None, torch.bfloat16, row_major=True),
    "sparsify": sparsify_step,
    "sae-lens": sae_lens_step,
}


def status_kib(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])


def measure(implementation: str, shape: Shape, device: str, rounds: int) -> dict[str, float]:
    """Runs in the worker process."""
    torch.manual_seed(0)
    x = torch.randn(shape.batch, shape.d_model, device=device)
    step = BUILDERS[implementation](shape, device)
    return measure_cuda(step, x, shape, rounds) if device == "cuda" else measure_cpu(step, x, shape, rounds)


def measure_cpu(step: Step, x: torch.Tensor, shape: Shape, rounds: int) -> dict[str, float]:
    """Peak memory of one step, then step and floors timed alternately."""
    step(x[:64])  # warm-up on a few rows: lazy imports and Adam's moments, which every implementation holds
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident set
    before = status_kib("VmRSS")
    step(x)
    step(x)
    peak_mib = (status_kib("VmHWM") - before) / 1024
    W_enc, warm = torch.randn(shape.d_model, shape.n), torch.empty(shape.batch, shape.n)
    floors = {"floor_s": lambda: x @ W_enc, "gemm_s": lambda: torch.mm(x, W_enc, out=warm)}
    times: dict[str, list[float]] = {"step_s": [], "floor_s": [], "gemm_s": []}
    for _ in range(rounds):
        times["step_s"].append(timed(lambda: step(x)))
        for name, floor in floors.items():
            times[name].append(timed(floor))
    return {name: statistics.median(values) for name, values in times.items()} | {"peak_mib": peak_mib}


def measure_cuda(step: Step, x: torch.Tensor, shape: Shape, rounds: int) -> dict[str, float]:
    """Peak allocation over two steps after warm-up, then step and floors timed alternately with CUDA events."""
    step(x[:64])
    step(x)  # Triton's compilation, cuBLAS's workspaces, Adam's moments
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(x)
    step(x)
    torch.cuda.synchronize()
    peak_mib = torch.cuda.max_memory_allocated() / 2**20
    floors = cuda_floors(shape)
    times: dict[str, list[float]] = {"step_s": [], **{name: [] for name in floors}}
    for _ in range(rounds):
        times["step_s"].append(cuda_timed(lambda: step(x)))
        for name, floor in floors.items():
            times[name].append(cuda_timed(floor))
    result = {name: statistics.median(values) for name, values in times.items()}
    return result | {"floor_s": result["bf16_gemm_s"] + result["adam_s"], "peak_mib": peak_mib}


def cuda_floors(shape: Shape) -> dict[str, Callable[[], object]]:
    """The encoder GEMM in bf16 and fp32 into warm outputs, and one fused Adam step over the SAE's parameters."""
    d, n = shape.d_model, shape.n
    x, W = torch.randn(shape.batch, d, device="cuda"), torch.randn(d, n, device="cuda")
    x16, W16 = x.bfloat16(), W.bfloat16()
    out16 = torch.empty(shape.batch, n, device="cuda", dtype=torch.bfloat16)
    out32 = torch.empty(shape.batch, n, device="cuda")
    params = [torch.randn(*size, device="cuda", requires_grad=True) for size in ((d, n), (n, d), (n,), (d,))]
    for param in params:
        param.grad = torch.randn_like(param)
    adam = torch.optim.Adam(params, lr=1e-4, fused=True)
    adam.step()  # its moments exist before timing
    return {
        "bf16_gemm_s": lambda: torch.mm(x16, W16, out=out16),
        "fp32_gemm_s": lambda: torch.mm(x, W, out=out32),
        "adam_s": adam.step,
    }


def cuda_timed(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile(implementation: str, shape: Shape, device: str) -> None:
    """A torch.profiler table of three steps after warm-up: the kernels by their own device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    x = torch.randn(shape.batch, shape.d_model, device=device)
    step = BUILDERS[implementation](shape, device)
    for _ in range(3):
        step(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profiler(activities=activities) as trace:
        for _ in range(3):
            step(x)
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"{implementation}, {shape}, {device}: 3 steps")
    print(trace.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60))


def breakdown(shape: Shape, device: str, steps: int = 3) -> list[tuple[str, float]]:
    """saelab's step split into its phases (`saelab.kernels.phases`), in seconds per step, from a profile
    of `steps` steps after warm-up; "other" is the rest (loss, AuxK bookkeeping, metrics, autograd)."""
    from torch.profiler import profile as profiler
    from torch.profiler import record_function

    from saelab.kernels.phases import PHASES

    x = torch.randn(shape.batch, shape.d_model, device=device)
    step = saelab_step(shape, device)
    for _ in range(3):
        step(x)
    with profiler() as trace:
        for _ in range(steps):
            with record_function("step"):
                step(x)
    totals = {event.key: event.cpu_time_total / 1e6 / steps for event in trace.key_averages()}
    parts = [(name.removeprefix("step: "), totals.get(name, 0.0)) for name in PHASES]
    return [*parts, ("other", totals["step"] - sum(seconds for _, seconds in parts)), ("step", totals["step"])]


def warm_gemm_seconds(shape: Shape) -> float:
    """The median of five encoder products [batch, d] × [d, n] into a warm output (the main table's GEMM)."""
    W_enc, warm, x = (
        torch.randn(shape.d_model, shape.n),
        torch.empty(shape.batch, shape.n),
        torch.randn(shape.batch, shape.d_model),
    )
    return statistics.median(timed(lambda: torch.mm(x, W_enc, out=warm)) for _ in range(5))


def print_breakdown(shapes: list[Shape], device: str) -> None:
    """One column per width: each phase's milliseconds and its multiple of one warm encoder GEMM."""
    columns = {shape.n: (breakdown(shape, device), warm_gemm_seconds(shape)) for shape in shapes}
    header = f"{'phase (ms, ×GEMM)':<32}" + "".join(f"{n:>20,}" for n in columns)
    print(header + "\n" + "-" * len(header))
    names = [name for name, _ in next(iter(columns.values()))[0]]
    for i, name in enumerate(names):
        cells = [f"{parts[i][1] * 1e3:>11.1f} {parts[i][1] / gemm_s:>6.2f}×" for parts, gemm_s in columns.values()]
        print(f"{name:<32}" + "".join(f"{cell:>20}" for cell in cells))
    print(f"{'one warm GEMM':<32}" + "".join(f"{gemm_s * 1e3:>11.1f} {1:>6.2f}×" for _, gemm_s in columns.values()))
    print("\n(under a profiler, which adds to every op: the step's own ratio to the GEMM is the main table's)")


def run_worker(implementation: str, shape: Shape, device: str, rounds: int) -> dict[str, float] | str:
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    shape_arg = f"{shape.d_model},{shape.n},{shape.k},{shape.batch}"
    command = [sys.executable, __file__, "--worker", implementation, shape_arg, "--device", device]
    command += ["--rounds", str(rounds)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["failed"])[-1]
        return "not installed" if "ModuleNotFoundError" in last else last[:100]
    return json.loads(result.stdout.strip().splitlines()[-1])


Row = tuple[Shape, str, "dict[str, float] | str"]
Cells = Callable[[Shape, dict[str, float], list[str]], str]  # a measured row's cells, given its ratios to the peers


def peer_ratios(rows: list[Row], shape: Shape, step_s: float) -> list[str]:
    """This step's speed-up over sparsify's and SAELens's steps at the same shape."""
    by_key = {(s, impl): r for s, impl, r in rows}
    ratios = []
    for peer in ("sparsify", "sae-lens"):
        other = by_key.get((shape, peer))
        ratios.append(f"{other['step_s'] / step_s:.2f}×" if isinstance(other, dict) else "–")
    return ratios


def print_rows(rows: list[Row], header: str, label: Callable[[Shape, str], str], cells: Cells) -> None:
    """A header, then a line per row: its label, then its cells (or why it has none)."""
    print(header)
    print("-" * len(header))
    for shape, implementation, r in rows:
        measured = r if isinstance(r, str) else cells(shape, r, peer_ratios(rows, shape, r["step_s"]))
        print(f"{label(shape, implementation)} {measured}")


def print_cpu_table(rows: list[Row]) -> None:
    header = (
        f"{'n_latents':>9}  {'implementation':<20} {'tokens/s':>9} {'step/floor':>10} {'step/GEMM':>9}"
        f" {'vs sparsify':>11} {'vs SAELens':>10} {'peak MiB':>9}"
    )

    def cells(shape: Shape, r: dict[str, float], ratios: list[str]) -> str:
        return (
            f"{shape.batch / r['step_s']:>9,.0f} {r['step_s'] / r['floor_s']:>9.2f}×"
            f" {r['step_s'] / r['gemm_s']:>8.2f}× {ratios[0]:>11} {ratios[1]:>10} {r['peak_mib']:>9,.0f}"
        )

    print_rows(rows, header, lambda shape, implementation: f"{shape.n:>9}  {implementation:<20}", cells)


def print_cuda_table(rows: list[Row]) -> None:
    header = (
        f"{'shape':<28} {'implementation':<20} {'ms/step':>8} {'tokens/s':>11} {'vs sparsify':>11} {'vs SAELens':>10}"
        f" {'step/floor':>10} {'peak MiB':>9}"
    )

    def cells(shape: Shape, r: dict[str, float], ratios: list[str]) -> str:
        return (
            f"{r['step_s'] * 1e3:>8.2f} {shape.batch / r['step_s']:>11,.0f}"
            f" {ratios[0]:>11} {ratios[1]:>10} {r['step_s'] / r['floor_s']:>9.2f}× {r['peak_mib']:>9,.0f}"
        )

    print_rows(rows, header, lambda shape, implementation: f"{str(shape):<28} {implementation:<20}", cells)
    print("\nfloors (ms), as each shape's first worker timed them:")
    seen = set()
    for shape, _, r in rows:
        if isinstance(r, dict) and shape not in seen:
            seen.add(shape)
            print(
                f"  {str(shape):<28} bf16 GEMM {r['bf16_gemm_s'] * 1e3:7.3f}   fp32 GEMM {r['fp32_gemm_s'] * 1e3:7.3f}"
                f"   Adam {r['adam_s'] * 1e3:7.3f}   floor (bf16 GEMM + Adam) {r['floor_s'] * 1e3:7.3f}"
            )


def parse_shape(text: str) -> Shape:
    d_model, n, k, batch = (int(part) for part in text.split(","))
    return Shape(d_model, n, k, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("IMPLEMENTATION", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, help="timed steps per implementation, median reported (5 CPU, 10 CUDA)")
    parser.add_argument("--widths", type=int, nargs="+", help="CPU: n_latents at d_model 576, k 32, batch 4096")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", help="d_model,n_latents,k,batch each")
    parser.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS)
    parser.add_argument("--profile", choices=IMPLEMENTATIONS, nargs="+", help="print profiler tables of these instead")
    parser.add_argument("--breakdown", action="store_true", help="saelab's step by phase at each width instead")
    args = parser.parse_args()
    rounds = args.rounds or (10 if args.device == "cuda" else 5)
    if args.worker:
        print(json.dumps(measure(args.worker[0], parse_shape(args.worker[1]), args.device, rounds)))
        return
    shapes = args.shapes or (CUDA_SHAPES if args.device == "cuda" else CPU_SHAPES)
    if args.widths:
        shapes = [Shape(576, n, 32, 4096) for n in args.widths]
    if args.breakdown:
        describe(args.device)
        print_breakdown(shapes, args.device)
        return
    if args.profile:
        for shape in shapes:
            for implementation in args.profile:
                profile(implementation, shape, args.device)
        return
    describe(args.device)
    skip_bf16 = args.device == "cpu" and not cpu_has_fast_bf16()
    rows = [
        (shape, implementation, SLOW_BF16 if skip_bf16 and "bf16" in implementation else None)
        for shape in shapes
        for implementation in args.only or DEFAULTS[args.device]
    ]
    rows = [(shape, name, skipped or run_worker(name, shape, args.device, rounds)) for shape, name, skipped in rows]
    print_cuda_table(rows) if args.device == "cuda" else print_cpu_table(rows)


def describe(device: str) -> None:
    if device == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; CUDA events, peak = max_memory_allocated\n")
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {cpu_capability()}: a bf16 "
        f"product takes {bf16_slowdown():.2f}× as long as float32"
        + ("" if cpu_has_fast_bf16() else f" (no bf16 matrix instructions: bf16 rows skipped, {SLOW_BF16})")
    )
    print("floor = x @ W, one dense encoder matmul [batch, d] × [d, n]; GEMM = the same into a warm")
    print("output (no page faults); both timed alternately with each step\n")


if __name__ == "__main__":
    main()
