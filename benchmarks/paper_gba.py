"""GBA's feature-recovery table (Chen et al. 2025, the imbalanced toy), rerun with saelab's SAEs.

128 true features in d = 42; half the rows have 3 active features, half 20 (`saelab.eval.mixed_sparsity`,
rows scaled to unit norm), so every feature fires on ≈ 9 % of rows. A true feature counts as recovered
when some decoder row has cosine ≥ 0.9 with it (also shown at 0.8).

    method                      paper (cos ≥ 0.9)
    TopK k = 20                 98.4 %
    TopK k = 30                 24.2 %
    GBA                         100 %      targets 0.5 … 1e-3 in 10 groups
    GBA, wrong frequency range  3.9 %      here targets 0.5 … 0.15: every one above the features' 0.09

What the paper's summaries leave out was found by search (a pure-PyTorch sweep, then saelab): 2048
latents (16 per feature; at 512 GBA found 56 %), rows of unit norm (without, no SAE recovered a feature
at 0.9: the 20-feature rows dominate the loss), b_dec (the paper's b_pre) held at the data's centre
(`train_b_dec: false`; trained, TopK k 20 found none), TopK at lr 3e-3 for 4000 steps (at 1e-3 it is
still climbing, 87.5 %), GBA at lr 1e-3 for 3000 steps. GBA recovers in the regime of the paper's
analysis, a small output scale a that does not train: each latent is pulled toward the rows it fires
on, so the latents of the groups whose target is at or below the features' frequency each settle on one
feature. Its ladder fires ≈ 205 latents a row in d = 42, so saelab's default takes that form here (the
analysis regime: tied, a fixed at 0.01; `SAEConfig.gba_regime`). Two rows show the reconstruction
regime's forms on the same data: with a trained (`output_scale: trained`) or untied (`tied: false`, the
default where the ladder fires fewer latents than d_in, as on SmolLM2) the latents fit x together,
reconstruct it almost exactly (FVU ≈ 0 at L0 ≈ 200 > d) and find no feature. "Wrong range" is not
specified by the summaries; here it is a ladder whose every target is above the features' frequency.

    python benchmarks/paper_gba.py [--d-sae 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import torch

from saelab.eval.mixed_sparsity import MixedSparsityConfig, MixedSparsityFeatures
from saelab.eval.recovery import max_cosine
from saelab.sae.config import SAEConfig
from saelab.train.config import TrainConfig
from saelab.train.loss import normalized_mse
from saelab.train.trainer import train

BATCH_SIZE = 512


@dataclass
class Method:
    sae: SAEConfig
    paper: float | None  # the paper's recovery at cosine ≥ 0.9
    lr: float
    steps: int


def methods(d_sae: int) -> list[Method]:
    # b_pre held at the data's centre, as in the paper's model; rows already unit norm, so no per-token map
    fixed = dict(d_sae=d_sae, train_b_dec=False, input_norm="none")
    gba = dict(**fixed, architecture="gba", n_groups=10, target_high=0.5, update_tokens=BATCH_SIZE)
    return [
        Method(SAEConfig(**fixed, architecture="topk", k=20, name="topk-k20"), 0.984, 3e-3, 4000),
        Method(SAEConfig(**fixed, architecture="topk", k=30, name="topk-k30"), 0.242, 3e-3, 4000),
        Method(SAEConfig(**gba, target_low=1e-3, name="gba"), 1.0, 1e-3, 3000),  # the default: the analysis regime
        Method(SAEConfig(**gba, target_low=0.15, name="gba-wrong-range"), 0.039, 1e-3, 3000),
        Method(SAEConfig(**gba, target_low=1e-3, output_scale="trained", name="gba-a-trained"), None, 1e-3, 3000),
        Method(SAEConfig(**gba, target_low=1e-3, tied=False, name="gba-untied"), None, 1e-3, 3000),
    ]


def train_methods(chosen: list[Method], data: MixedSparsityFeatures, seed: int) -> dict[str, torch.nn.Module]:
    """One pass over the same batches for each (lr, steps) pair of methods."""
    saes = {}
    for lr, steps in dict.fromkeys((m.lr, m.steps) for m in chosen):
        n_tokens = steps * BATCH_SIZE
        with tempfile.TemporaryDirectory() as run:
            cfg = TrainConfig(
                out=run,
                saes=[m.sae for m in chosen if (m.lr, m.steps) == (lr, steps)],
                n_tokens=n_tokens,
                batch_size=BATCH_SIZE,
                lr=lr,
                device="cpu",
                seed=seed,
                checkpoint_every_tokens=n_tokens,
            )
            saes |= train(cfg, source=data)
    return saes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = MixedSparsityFeatures(MixedSparsityConfig(seed=args.seed))
    chosen = methods(args.d_sae)
    saes = train_methods(chosen, data, args.seed)
    x, _ = data.sample(16_384, torch.Generator().manual_seed(10_000 + args.seed))

    print(
        f"\n{data.cfg.n_features} features in d {data.cfg.d_in}, rows of {data.cfg.sparsities} active features "
        f"(each feature fires on {data.frequency:.1%}), unit-norm rows; {args.d_sae} latents, batch {BATCH_SIZE}"
    )
    print(f"{'method':<17}{'cos≥0.9':>9}{'paper':>8}{'cos≥0.8':>9}{'mean cos':>10}{'FVU':>8}{'L0':>7}  lr, steps")
    for method in chosen:
        sae = saes[method.sae.label]
        with torch.no_grad():
            best = max_cosine(data.directions, sae.W_dec)
            out = sae.eval()(x)
        fvu = float(normalized_mse(out.reconstruction, x))
        l0 = float((out.latents != 0).sum(-1).float().mean())
        paper = "" if method.paper is None else f"{method.paper:.1%}"
        print(
            f"{method.sae.label:<17}{(best >= 0.9).float().mean():>9.1%}{paper:>8}{(best >= 0.8).float().mean():>9.1%}"
            f"{best.mean():>10.3f}{fvu:>8.3f}{l0:>7.1f}  {method.lr:g}, {method.steps}"
            + (f", {sae.cfg.gba_form()}" if sae.cfg.architecture == "gba" else "")
        )


if __name__ == "__main__":
    main()
