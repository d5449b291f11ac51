"""One full TopK training step — forward, backward, Adam, decoder renorm — for saelab, sparsify and SAELens.

    make bench-env                                   # once: .venv-bench with eai-sparsify and sae-lens
    .venv-bench/bin/python benchmarks/kernels.py     # d_model 576, k 32, batch 4096, n ∈ {4608, 9216, 36864}

Each implementation runs in its own process (so its peak memory is its own). In that process the
step and two floors are timed in turn, so the ratios are measured under the same machine load:

- floor: one dense encoder matmul [4096, 576] × [576, n] as one writes it, `x @ W` (a fresh output);
- GEMM: the same product into a warm, reused output: the arithmetic alone. A fresh 150 MB output
  costs ~15 % more on the CPU in page faults; saelab reuses its buffer, so it is held to both.

All three get the same fused Adam, and no latent is dead (AuxK off), as at the start of training.
Peak memory is the process's peak resident set over two full steps, less what it held after a
warm-up step on 64 rows (parameters, Adam's moments, imports): the gradients, the activations and
any buffer an implementation keeps between steps count.
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
from pathlib import Path

import torch

D_MODEL, K, BATCH = 576, 32, 4096
WIDTHS = (4608, 9216, 36864)
TILE = 4096  # saelab's memory-bounded mode: latents per tile
IMPLEMENTATIONS = ("saelab", "saelab-tiled", "saelab-bf16", "sparsify", "sae-lens")


def saelab_step(
    n: int, tile: int | None = None, matmul_dtype: torch.dtype | None = None
) -> Callable[[torch.Tensor], None]:
    from saelab.sae import SAEConfig, build_sae
    from saelab.train.dead_latents import DeadLatentTracker
    from saelab.train.step import KernelOptions, train_step

    sae = build_sae(SAEConfig(d_in=D_MODEL, d_sae=n, k=K), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    tracker = DeadLatentTracker(n, dead_tokens=10**9)
    kernels = KernelOptions(tile, matmul_dtype)
    return lambda x: train_step(sae, optimizer, x, None, tracker, 1 / 32, D_MODEL // 2, kernels)


def sparsify_step(n: int) -> Callable[[torch.Tensor], None]:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D_MODEL, SparseCoderConfig(num_latents=n, k=K))
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-4, fused=True)
    no_dead = torch.zeros(n, dtype=torch.bool)

    def step(x: torch.Tensor) -> None:
        out = coder(x, dead_mask=no_dead)
        optimizer.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        coder.set_decoder_norm_to_unit_norm()

    return step


def sae_lens_step(n: int) -> Callable[[torch.Tensor], None]:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=n, k=K, dtype="float32", device="cpu"))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    no_dead = torch.zeros(n, dtype=torch.bool)

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(TrainStepInput(x, {}, no_dead, 0, False))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        with torch.no_grad():  # SAELens's TopK rescales by the decoder norm; renormalise as the others do
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)

    return step


BUILDERS: dict[str, Callable[[int], Callable[[torch.Tensor], None]]] = {
    "saelab": saelab_step,
    "saelab-tiled": lambda n: saelab_step(n, tile=TILE),
    "saelab-bf16": lambda n: saelab_step(n, matmul_dtype=torch.bfloat16),
    "sparsify": sparsify_step,
    "sae-lens": sae_lens_step,
}


def status_kib(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])


def measure(implementation: str, n: int, rounds: int) -> dict[str, float]:
    """Runs in the worker process: peak memory of one step, then step and floor timed alternately."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, D_MODEL)
    step = BUILDERS[implementation](n)
    step(x[:64])  # warm-up on a few rows: lazy imports and Adam's moments, which every implementation holds
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current resident set
    before = status_kib("VmRSS")
    step(x)
    step(x)
    peak_mib = (status_kib("VmHWM") - before) / 1024
    W_enc, warm = torch.randn(D_MODEL, n), torch.empty(BATCH, n)
    floors = {"floor_s": lambda: x @ W_enc, "gemm_s": lambda: torch.mm(x, W_enc, out=warm)}
    times: dict[str, list[float]] = {"step_s": [], "floor_s": [], "gemm_s": []}
    for _ in range(rounds):
        times["step_s"].append(timed(lambda: step(x)))
        for name, floor in floors.items():
            times[name].append(timed(floor))
    return {name: statistics.median(values) for name, values in times.items()} | {"peak_mib": peak_mib}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_worker(implementation: str, n: int, rounds: int) -> dict[str, float] | str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, __file__, "--worker", implementation, str(n), "--rounds", str(rounds)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["failed"])[-1]
        return "not installed" if "ModuleNotFoundError" in last else last[:60]
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows: list[tuple[int, str, dict[str, float] | str]]) -> None:
    header = (
        f"{'n_latents':>9}  {'implementation':<14} {'tokens/s':>9} {'step/floor':>10} {'step/GEMM':>9}"
        f" {'vs sparsify':>11} {'vs SAELens':>10} {'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    by_key = {(n, impl): r for n, impl, r in rows}
    for n, impl, r in rows:
        if isinstance(r, str):
            print(f"{n:>9}  {impl:<14} {r}")
            continue
        speed = BATCH / r["step_s"]
        ratios = []
        for peer in ("sparsify", "sae-lens"):
            other = by_key.get((n, peer))
            ratios.append(f"{other['step_s'] / r['step_s']:.2f}×" if isinstance(other, dict) else "–")
        print(
            f"{n:>9}  {impl:<14} {speed:>9,.0f} {r['step_s'] / r['floor_s']:>9.2f}× {r['step_s'] / r['gemm_s']:>8.2f}×"
            f" {ratios[0]:>11} {ratios[1]:>10}"
            f" {r['peak_mib']:>9,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("IMPLEMENTATION", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per implementation (median reported)")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args.rounds)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {D_MODEL}, k {K}, batch {BATCH}")
    print(f"floor = x @ W, one dense encoder matmul [{BATCH}, {D_MODEL}] × [{D_MODEL}, n]; GEMM = the same into a warm")
    print("output (no page faults); both timed alternately with each step\n")
    rows = []
    for n in args.widths:
        for implementation in args.only:
            rows.append((n, implementation, run_worker(implementation, n, args.rounds)))
    print_table(rows)


if __name__ == "__main__":
    main()
