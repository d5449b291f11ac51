"""Does the trainer feed the step? `saelab.train` from an activation store and from a tensor, beside the bare step.

    .venv/bin/python benchmarks/data_path.py                         # CPU: d_model 576, 4608 latents, batch 4096
    python benchmarks/data_path.py --device cuda --n-latents 9216    # a GPU (benchmarks/gpu_check.sh runs this)

Rows, all one TopK SAE and one batch size, timed in this one process in turn:

- open: `ActivationStore(path)` (the manifest, every shard's size and sha256), a one-time cost;
- read, read-N: the store's batches iterated alone, on one thread and on N (what the data path can
  deliver; `saelab train` reads on up to 8 threads when the step runs on a GPU, on one on the CPU);
- store: `train()` from the store, as `saelab train` runs it;
- tensor: `train()` from a `TensorSource` holding the same rows in CPU memory;
- step: `train_step` alone on batches already on the device (the ceiling).

A `train()` row's tokens/s is its steady pace, between its first and last logged step (from the
run's metrics.jsonl); its one-time cost (opening, the initialisation sample, saving) is the rest of
its wall clock. Every row's pace is also given as a fraction of the bare step's.

`--profile` then trains from the store once more under `torch.profiler` and prints where the host's
time went (self CPU time) and, on a GPU, the device's kernels: what to look at when the store row
falls short of the step.

The store is a synthetic one written with the real shard code (`--store PATH` reads a harvested one
instead). AuxK stays off (`dead_tokens` beyond the run) so that every row runs the same step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saelab.harvest.manifest import StoreManifest
from saelab.harvest.shards import write_shard
from saelab.harvest.store import ActivationStore
from saelab.sae import SAEConfig, build_sae
from saelab.train.config import TrainConfig
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.sources import TensorSource
from saelab.train.step import KernelOptions, train_step
from saelab.train.trainer import train

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 128


def write_synthetic_store(path: Path, rows: int, d_model: int, shards: int, dtype: str) -> None:
    """`rows` rows of sparse mixtures of random directions (plus a shared offset, as residual streams have)."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(4 * d_model, d_model, generator=generator)
    offset = 3 * torch.randn(d_model, generator=generator)
    contexts_per_shard = max(1, rows // CONTEXT // shards)
    records = []
    for index in range(shards):
        n = contexts_per_shard * CONTEXT
        codes = torch.rand(n, len(directions), generator=generator).pow(40)  # most weights near zero
        activations = (codes @ directions + offset).to(getattr(torch, dtype))
        tokens = torch.randint(0, 50_000, (contexts_per_shard, CONTEXT + 1), generator=generator, dtype=torch.int32)
        tensors = {HOOK: activations, "token_ids": tokens[:, 1:].reshape(-1), "contexts": tokens}
        records.append(write_shard(path, index, index * contexts_per_shard, contexts_per_shard, tensors))
    StoreManifest(
        config={},
        model="synthetic",
        hooks=[HOOK],
        d_model=d_model,
        dtype=dtype,
        context_size=CONTEXT + 1,
        first_position=1,
        n_contexts_planned=shards * contexts_per_shard,
        tokenizer={},
        corpus={},
        versions={},
        shards=records,
        complete=True,
    ).save(path)


def train_config(args: argparse.Namespace, store: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        store=str(store),
        out=str(out),
        saes=[SAEConfig(architecture="topk", d_sae=args.n_latents, k=args.k)],
        n_tokens=args.steps * args.batch,
        batch_size=args.batch,
        dead_tokens=10**15,
        checkpoint_every_tokens=10**15,  # only the final checkpoint
        log_every_steps=args.log_every,
        dtype=args.dtype,
        device=args.device,
    )


def timed_train(cfg: TrainConfig, source: TensorSource | None) -> dict[str, float]:
    """Wall clock of one `train()`, and its steady tokens/s from the first to the last logged step."""
    start = time.perf_counter()
    train(cfg, source=source, progress=False)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    elapsed = {r["step"]: r["tokens"] / r["tokens_per_s"] for r in (first, last)}
    steady = (last["tokens"] - first["tokens"]) / (elapsed[last["step"]] - elapsed[first["step"]])
    return {"tokens_per_s": steady, "one_time_s": wall - cfg.n_tokens / steady}


def timed_read(store: ActivationStore, batch: int, steps: int, threads: int) -> dict[str, float]:
    store.read_threads = threads
    start = time.perf_counter()
    for index, _ in enumerate(store.batches(batch, seed=0)):
        if index + 1 == steps:
            break
    store.read_threads = 1
    return {"tokens_per_s": steps * batch / (time.perf_counter() - start)}


def timed_step(args: argparse.Namespace, activations: torch.Tensor, device: torch.device) -> dict[str, float]:
    """The bare step on a few batches resident on the device, after two warm-up steps."""
    sae = build_sae(SAEConfig(architecture="topk", d_in=activations.shape[1], d_sae=args.n_latents, k=args.k))
    sae = sae.to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    tracker = DeadLatentTracker(args.n_latents, dead_tokens=10**15, device=device)
    batches = [b.to(device).float() for b in activations[: 4 * args.batch].split(args.batch)]
    bf16 = TrainConfig(dtype=args.dtype).resolved_dtype(str(device)) == "bfloat16"
    kernels = KernelOptions(matmul_dtype=torch.bfloat16 if bf16 else None)
    for x in batches[:2]:
        train_step(sae, optimizer, x, None, tracker, 1 / 32, 0, kernels)
    synchronize(device)
    start = time.perf_counter()
    for step in range(args.steps):
        train_step(sae, optimizer, batches[step % len(batches)], None, tracker, 1 / 32, 0, kernels)
    synchronize(device)
    return {"tokens_per_s": args.steps * args.batch / (time.perf_counter() - start)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 on CUDA")
    parser.add_argument("--store", type=Path, help="a harvested store (default: write a synthetic one)")
    parser.add_argument("--rows", type=int, default=262_144, help="rows of the synthetic store")
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="also profile a train() from the store")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)  # its first use imports torch._dynamo (~1.4 s)
    work = Path(tempfile.mkdtemp(prefix="saelab-data-path-"))
    try:
        store_path = args.store or work / "store"
        if args.store is None:
            write_synthetic_store(store_path, args.rows, args.d_model, args.shards, args.store_dtype)
        start = time.perf_counter()
        store = ActivationStore(store_path)
        results = {"open": {"one_time_s": time.perf_counter() - start}}
        threads = min(8, os.cpu_count() or 1)
        results["read"] = timed_read(store, args.batch, args.steps, 1)
        results[f"read-{threads}"] = timed_read(store, args.batch, args.steps, threads)
        results["store"] = timed_train(train_config(args, store_path, work / "store-run"), None)
        in_memory = TensorSource(store.rows(torch.arange(store.n_rows), store.hook_name(None)).float())
        results["tensor"] = timed_train(train_config(args, store_path, work / "tensor-run"), in_memory)
        results["step"] = timed_step(args, in_memory.activations, device)
        print_table(args, store, results)
        if args.profile:
            profile_train(train_config(args, store_path, work / "profiled-run"), device)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile_train(cfg: TrainConfig, device: torch.device) -> None:
    """`train()` from the store under torch.profiler: the ops by host time, and on a GPU by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as trace:
        train(cfg, progress=False)
        synchronize(device)
    table = trace.key_averages()
    print(f"\ntrain() from the store under the profiler ({cfg.n_steps} steps), by host time:")
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    if device.type == "cuda":
        print("by device time:")
        print(table.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))


def print_table(args: argparse.Namespace, store: ActivationStore, results: dict[str, dict[str, float]]) -> None:
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
        f"TopK {store.d_model} × {args.n_latents}, k {args.k}, batch {args.batch}, {args.steps} steps, "
        f"{args.dtype}; store {store.n_rows:,} rows in {len(store.manifest.shards)} shards ({store.dtype})\n"
    )
    ceiling = results["step"]["tokens_per_s"]
    print(f"{'path':<8} {'tokens/s':>10} {'of the step':>11} {'one-time s':>10}")
    for name, result in results.items():
        pace = result.get("tokens_per_s")
        pace_text = f"{pace:>10,.0f} {pace / ceiling:>10.1%}" if pace else f"{'':>10} {'':>11}"
        once = result.get("one_time_s")
        print(f"{name:<8} {pace_text} {once if once is not None else float('nan'):>10.2f}")


if __name__ == "__main__":
    main()
