"""Harvest throughput against its physical floor: the bare forward pass it cannot avoid.

Both sides use the same loaded model, the same contexts in the same batches, and stop at the
same layer; the bare pass caches nothing and writes nothing. The harvest side is the whole
`harvest()` call (corpus reading, tokenisation, hooks, dtype conversion, shard writing, sha256,
manifest), so the ratio is the full cost of harvesting over the model itself. Repeats alternate
the two sides so machine noise hits both alike; the table reports medians.

    python benchmarks/harvest.py [--tokens 32768] [--repeats 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from itertools import islice

import torch

from saelab.harvest.config import HarvestConfig
from saelab.harvest.corpus import iter_documents
from saelab.harvest.harvester import harvest
from saelab.harvest.packing import iter_contexts
from saelab.models import load_model, parse_hook, stop_at_layer


def bare_forward_seconds(model, contexts: torch.Tensor, batch_size: int, stop: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(contexts), batch_size):
            model(contexts[begin : begin + batch_size], stop_at_layer=stop)
    return time.perf_counter() - start


def harvest_seconds(model, cfg: HarvestConfig) -> float:
    with tempfile.TemporaryDirectory() as folder:
        cfg.out = folder
        start = time.perf_counter()
        harvest(cfg, model=model, progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=32_768, help="activation rows to harvest per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = HarvestConfig(model=args.model, hooks=[args.hook], n_tokens=args.tokens, device="cpu", shard_contexts=64)
    model = load_model(cfg.model, cfg.device)
    stop = stop_at_layer([parse_hook(args.hook, model.cfg.n_layers)])
    n_contexts = -(-cfg.n_tokens // (cfg.context_size - 1))
    stream = iter_contexts(iter_documents(cfg.corpus), model.tokenizer, cfg.context_size, cfg.prepend_bos)
    contexts = torch.tensor(list(islice(stream, n_contexts)))
    forward_tokens = contexts.numel()

    bare_forward_seconds(model, contexts[: cfg.batch_size * 2], cfg.batch_size, stop)  # warm-up
    bare, harvested = [], []
    for _ in range(args.repeats):
        bare.append(bare_forward_seconds(model, contexts, cfg.batch_size, stop))
        harvested.append(harvest_seconds(model, cfg))

    bare_s, harvest_s = statistics.median(bare), statistics.median(harvested)
    print(
        f"\n{args.model} {args.hook}: {n_contexts} contexts × {cfg.context_size} tokens "
        f"= {forward_tokens:,} forward tokens, batch {cfg.batch_size}, {args.repeats} repeats (median)"
    )
    print(f"{'path':<28}{'seconds':>10}{'tokens/s':>12}{'cost vs bare':>14}")
    for name, seconds in (("bare forward (floor)", bare_s), ("harvest (store + sha256)", harvest_s)):
        print(f"{name:<28}{seconds:>10.2f}{forward_tokens / seconds:>12,.0f}{seconds / bare_s:>13.3f}x")
    print(f"harvest overhead: {100 * (harvest_s / bare_s - 1):+.1f}% (target ≤ +10%)")


if __name__ == "__main__":
    main()
