"""GBA's feature-recovery table (Chen et al. 2025, the imbalanced toy), rerun with saelab's SAEs.

128 true features in d = 42; half the rows have 3 active features, half 20 (`saelab.eval.mixed_sparsity`),
so every feature fires on ≈ 9 % of rows. Each SAE trains in one pass over the same batches; a true
feature counts as recovered when some decoder row has cosine ≥ 0.9 with it (also shown at 0.8).

    method                      paper (cos ≥ 0.9)
    TopK k = 20                 98.4 %
    TopK k = 30                 24.2 %
    GBA                         100 %      targets 0.5 … 1e-3 in 10 groups: the ladder covers 0.09
    GBA, wrong frequency range  3.9 %      here targets 1e-2 … 1e-4: every one far below 0.09

    python benchmarks/paper_gba.py [--d-sae 1280] [--epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from saelab.eval.mixed_sparsity import MixedSparsityConfig, MixedSparsityFeatures
from saelab.eval.recovery import max_cosine
from saelab.sae.config import SAEConfig
from saelab.train.config import TrainConfig
from saelab.train.loss import normalized_mse
from saelab.train.trainer import train

PAPER = {"topk-k20": 0.984, "topk-k30": 0.242, "gba": 1.0, "gba-wrong-range": 0.039}


def variants(d_sae: int, update_tokens: int) -> list[SAEConfig]:
    gba = dict(architecture="gba", d_sae=d_sae, n_groups=10, update_tokens=update_tokens)
    return [
        SAEConfig(architecture="topk", d_sae=d_sae, k=20, name="topk-k20"),
        SAEConfig(architecture="topk", d_sae=d_sae, k=30, name="topk-k30"),
        SAEConfig(**gba, target_high=0.5, target_low=1e-3, name="gba"),
        SAEConfig(**gba, target_high=1e-2, target_low=1e-4, name="gba-wrong-range"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-sae", type=int, default=1280)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of 65,536 rows")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = MixedSparsityFeatures(MixedSparsityConfig(seed=args.seed))
    n_tokens = args.epochs * data.cfg.n_rows
    with tempfile.TemporaryDirectory() as run:
        cfg = TrainConfig(
            out=run,
            saes=variants(args.d_sae, update_tokens=args.batch_size),
            n_tokens=n_tokens,
            batch_size=args.batch_size,
            lr=args.lr,
            device="cpu",
            seed=args.seed,
            checkpoint_every_tokens=n_tokens,
        )
        saes = train(cfg, source=data)
    x, _ = data.sample(16_384, torch.Generator().manual_seed(10_000 + args.seed))

    print(
        f"\n{data.cfg.n_features} features in d {data.cfg.d_in}, rows of {data.cfg.sparsities} active features "
        f"(each feature fires on {data.frequency:.1%}); {args.d_sae} latents, {n_tokens:,} training rows"
    )
    print(f"{'method':<18}{'cos≥0.9':>9}{'paper':>8}{'cos≥0.8':>9}{'mean cos':>10}{'FVU':>8}{'L0':>7}")
    for label, sae in saes.items():
        with torch.no_grad():
            best = max_cosine(data.directions, sae.W_dec)
            out = sae.eval()(x)
        fvu = float(normalized_mse(out.reconstruction, x))
        l0 = float((out.latents != 0).sum(-1).float().mean())
        print(
            f"{label:<18}{(best >= 0.9).float().mean():>9.1%}{PAPER[label]:>8.1%}{(best >= 0.8).float().mean():>9.1%}"
            f"{best.mean():>10.3f}{fvu:>8.3f}{l0:>7.1f}"
        )


if __name__ == "__main__":
    main()
