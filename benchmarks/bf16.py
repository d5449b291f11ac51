"""What the bf16 encoder product (`dtype: bfloat16`) costs in FVU and gains in speed, on the real store.

    .venv/bin/python benchmarks/bf16.py [--store runs/smollm2-135m/activations] [--tokens 409600]
    python benchmarks/bf16.py --device cuda --synthetic 262144 --tokens 2048000   # a GPU without the real store

Trains the same TopK SAE (same seed, same batches) twice, with the encoder's dense product in
float32 and in bf16 (float32 accumulation; kept values recomputed in float32), then prints both
FVUs and L0s on one fixed sample of the store and the training speed ratio measured in the same run.
`--synthetic N` trains on a store of N synthetic rows (`data_path.write_synthetic_store`) instead.
It also runs the float32-trained SAE's selection with a bf16 product on that sample: the share of
(token, latent) choices that change, and the FVU that follows, isolate the rounding's direct effect.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from data_path import write_synthetic_store

from saelab.harvest.store import ActivationStore
from saelab.sae import SAEConfig
from saelab.train.config import TrainConfig
from saelab.train.loss import normalized_mse
from saelab.train.sources import StoreSource
from saelab.train.trainer import train

SAMPLE_ROWS = 16_384


def train_once(store: str, tokens: int, dtype: str, out: Path, device: str) -> tuple[object, float]:
    cfg = TrainConfig(
        store=store,
        out=str(out),
        n_tokens=tokens,
        dtype=dtype,
        saes=[SAEConfig(d_sae=4608, k=32)],
        log_every_steps=50,
        device=device,
    )
    started = time.perf_counter()
    (sae,) = train(cfg, progress=False).values()
    return sae, time.perf_counter() - started


@torch.no_grad()
def sample_metrics(sae: torch.nn.Module, x: torch.Tensor, matmul_dtype: torch.dtype | None = None):
    """(FVU, L0, the chosen latents as a set of token·d_sae + latent ids) through the training kernels."""
    out = sae.sparse_forward(x, matmul_dtype=matmul_dtype)
    fired = out.values > 0
    chosen = set((torch.arange(len(x), device=x.device).unsqueeze(1) * sae.cfg.d_sae + out.indices)[fired].tolist())
    return float(normalized_mse(out.reconstruction, x)), float(fired.sum(-1).float().mean()), chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/smollm2-135m/activations")
    parser.add_argument("--tokens", type=int, default=409_600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--synthetic", type=int, metavar="ROWS", help="train on a synthetic store of ROWS rows")
    args = parser.parse_args()
    if args.synthetic is not None and args.synthetic < SAMPLE_ROWS:
        parser.error(f"--synthetic {args.synthetic}: the metrics need {SAMPLE_ROWS:,} rows; give at least that many")
    rows, saes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            args.store = str(Path(tmp) / "store")
            write_synthetic_store(Path(args.store), args.synthetic, d_model=576, shards=32, dtype="float32")
        source = StoreSource(ActivationStore(args.store))
        x = next(source.batches(SAMPLE_ROWS, seed=12345))[0].float().to(args.device)
        for dtype in ("float32", "bfloat16"):
            saes[dtype], seconds = train_once(args.store, args.tokens, dtype, Path(tmp) / dtype, args.device)
            rows[dtype] = (*sample_metrics(saes[dtype], x), seconds)
    exact_fvu, _, exact = sample_metrics(saes["float32"], x)
    rounded_fvu, _, rounded = sample_metrics(saes["float32"], x, torch.bfloat16)
    print(
        f"TopK 4608 latents, k 32, {args.tokens:,} training tokens of {args.store} on {args.device}; "
        f"metrics on {SAMPLE_ROWS:,} rows\n"
    )
    print(f"{'encoder product':<16} {'FVU':>7} {'L0':>6} {'train s':>8}")
    for dtype, (fvu, l0, _, seconds) in rows.items():
        print(f"{dtype:<16} {fvu:>7.4f} {l0:>6.1f} {seconds:>8.1f}")
    fvu_change = rows["bfloat16"][0] - rows["float32"][0]
    print(f"\nbf16 − float32 FVU: {fvu_change:+.4f}; speed-up {rows['float32'][3] / rows['bfloat16'][3]:.2f}×")
    print(
        f"float32-trained SAE, bf16 selection: {len(exact - rounded) / len(exact):.2%} of (token, latent) choices"
        f" change; FVU {exact_fvu:.4f} → {rounded_fvu:.4f}"
    )


if __name__ == "__main__":
    main()
