"""Throughput on 1 and 2 processes (torchrun, gloo on the CPU; 1 process on a GPU when there is one).

Two processes on a 2-core machine are not a speed-up test: the point is that the distributed paths
run, and what communication costs per step. Each row is one job launched as the user would
(`torch.distributed.run --standalone`), timed inside the job after start-up and model loading:

- harvest: SmolLM2-135M's `blocks.15.hook_resid_post`, tokens/s of `harvest()` (shards split by rank);
- train: a TopK SAE (d_in 576, 4608 latents, k 32, batch 4096) on random activations, tokens/s of the
  training loop. Data-parallel communication per step = step time on 2 ranks − step time of 1 rank
  on half the batch (each rank's share of the compute).

    OMP_NUM_THREADS=1 python benchmarks/scaling.py [--harvest-tokens 8192] [--train-steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_IN, D_SAE, K, BATCH = 576, 4608, 32, 4096


def launch(world: int, result: Path, *worker_args: str) -> dict:
    """Run this file as `--worker …` on `world` processes; return rank 0's JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    command += [__file__, "--worker", str(result), *worker_args]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return json.loads(result.read_text())


def harvest_worker(result: Path, tokens: int, device: str) -> None:
    from saelab import distributed
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest
    from saelab.models import load_model

    distributed.init_from_environment()
    model = load_model("smollm2-135m", distributed.device_for(device))
    with tempfile.TemporaryDirectory() as scratch:
        out = distributed.broadcast_object(scratch, "sharing the store folder")
        cfg = HarvestConfig(out=str(Path(out) / "store"), n_tokens=tokens, shard_contexts=8, device=device)
        distributed.barrier("starting the clock")
        start = time.perf_counter()
        manifest = harvest(cfg, model=model, progress=False)
        seconds = time.perf_counter() - start
        distributed.barrier("the last rank is done with the folder")
    if distributed.is_main():
        result.write_text(json.dumps({"tokens": manifest.n_rows, "seconds": seconds}))
    distributed.shutdown()


def train_worker(result: Path, steps: int, batch: int, device: str) -> None:
    from saelab import distributed
    from saelab.run_layout import METRICS_FILE
    from saelab.sae.config import SAEConfig
    from saelab.train.config import TrainConfig
    from saelab.train.sources import TensorSource
    from saelab.train.trainer import train

    distributed.init_from_environment()
    activations = torch.randn(max(4 * batch, 16_384), D_IN, generator=torch.Generator().manual_seed(0)) + 0.5
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(distributed.broadcast_object(scratch, "sharing the run folder")) / "run"
        cfg = TrainConfig(
            out=str(out),
            saes=[SAEConfig(architecture="topk", d_sae=D_SAE, k=K)],
            n_tokens=steps * batch,
            batch_size=batch,
            init_sample_rows=4096,
            checkpoint_every_tokens=10**12,  # the final checkpoint only
            log_every_steps=steps,
            device=device,
        )
        train(cfg, source=TensorSource(activations), progress=False)
        if distributed.is_main():
            last = json.loads((out / METRICS_FILE).read_text().splitlines()[-1])
            result.write_text(json.dumps({"tokens_per_s": last["tokens_per_s"], "steps": steps, "batch": batch}))
        distributed.barrier("the last rank is done with the folder")
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvest-tokens", type=int, default=8192)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.job
        if kind == "harvest":
            harvest_worker(Path(args.worker), int(rest[0]), rest[1])
        else:
            train_worker(Path(args.worker), int(rest[0]), int(rest[1]), rest[2])
        return

    runs = [("cpu", 1), ("cpu", 2)] + ([("cuda", 1)] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        for device, world in runs:
            done = launch(world, result, "harvest", str(args.harvest_tokens), device)
            rows.append(("harvest", device, world, BATCH, done["tokens"] / done["seconds"], None))
        half_step = None
        for device, world in runs:
            done = launch(world, result, "train", str(args.train_steps), str(BATCH), device)
            step_ms = 1000 * BATCH / done["tokens_per_s"]
            if device == "cpu" and world == 1:  # 1 rank on half the batch: each rank's compute on 2 ranks
                half = launch(1, result, "train", str(args.train_steps), str(BATCH // 2), device)
                half_step = 1000 * (BATCH // 2) / half["tokens_per_s"]
                rows.append(("train", device, 1, BATCH // 2, half["tokens_per_s"], half_step))
            rows.append(("train", device, world, BATCH, done["tokens_per_s"], step_ms))
    threads = os.environ.get("OMP_NUM_THREADS", "(unset)")
    print(f"OMP_NUM_THREADS={threads}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"{'job':8}{'device':>8}{'procs':>7}{'batch':>7}{'tokens/s':>12}{'ms/step':>10}")
    for job, device, world, batch, tokens_per_s, step_ms in rows:
        batch_text = str(batch) if job == "train" else "-"
        step_text = f"{step_ms:10.1f}" if step_ms is not None else f"{'-':>10}"
        print(f"{job:8}{device:>8}{world:>7}{batch_text:>7}{tokens_per_s:12,.0f}{step_text}")
    two = next(r for r in rows if r[0] == "train" and r[1] == "cpu" and r[2] == 2)
    if half_step is not None:
        print(
            f"data-parallel communication per step (2 ranks, gloo): {two[5] - half_step:.1f} ms "
            f"= {two[5]:.1f} ms on 2 ranks − {half_step:.1f} ms for 1 rank on half the batch"
        )


if __name__ == "__main__":
    main()
