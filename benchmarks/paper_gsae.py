"""g-SAE against TopK on SmolLM2 (Olmo et al. 2024, "Features that Make a Difference"), the paper's two claims.

1. Faithfulness: at equal k, a g-SAE spliced into the model loses less (Δ LM loss, KL to the clean
   model) than TopK. Both are evaluated on held-out text (`saelab.eval.evaluate`); the g-SAE also
   *with* its gradient-aware selection (the gradient of the held-out text's own loss), which is how
   it trains, and the fraction of its selections that plain TopK would not make.
2. Steering: its latents move the model more when added in arbitrary contexts. For `--latents`
   random latents, add α·d_i (the decoder direction in model units, α =
   `--strength` × the median residual norm) at every position ≥ 1 of held-out contexts and measure
   the mean KL(steered ‖ clean) per predicted token and the mean rise in log-probability of the 5
   tokens the latent's direction pushes up most (its logit effects).

Needs the store harvested with gradients: `saelab harvest --config configs/harvest-smollm2-gradients.yaml`.

    python benchmarks/paper_gsae.py [--n-tokens 409600] [--eval-tokens 4096] [--latents 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import evaluate, held_out_contexts
from saelab.harvest.store import ActivationStore
from saelab.models import load_model
from saelab.sae.config import SAEConfig
from saelab.steer.effect import steering_effect
from saelab.train.config import TrainConfig
from saelab.train.trainer import train

KS = (16, 32, 64)
BETAS = (0.5, 2.0, 4.0)  # at k = 32, beside β = 1 at every k


def sweep(d_sae: int) -> list[SAEConfig]:
    saes = [SAEConfig(architecture="topk", d_sae=d_sae, k=k) for k in KS]
    saes += [SAEConfig(architecture="gsae", d_sae=d_sae, k=k, beta=1.0, name=f"gsae-k{k}-b1") for k in KS]
    saes += [SAEConfig(architecture="gsae", d_sae=d_sae, k=32, beta=b, name=f"gsae-k32-b{b:g}") for b in BETAS]
    return saes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="runs/smollm2-135m/activations-grad")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--n-tokens", type=int, default=409_600)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--strength", type=float, default=0.5, help="α as a multiple of the median residual norm")
    parser.add_argument("--steer-contexts", type=int, default=8)
    args = parser.parse_args()

    store = ActivationStore(args.store)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cfg = TrainConfig(store=args.store, out=str(run), saes=sweep(args.d_sae), n_tokens=args.n_tokens, device="cpu")
        saes = train(cfg)
        model = load_model(store.manifest.model, "cpu")
        results = evaluate(EvalConfig(run=str(run), n_tokens=args.eval_tokens, device="cpu"), model=model)

    print(f"\nheld-out {args.eval_tokens:,} tokens; {args.n_tokens:,} training tokens; {args.d_sae} latents")
    print(
        f"{'sae':<16}{'k':>4}{'β':>5}{'FVU':>7}{'L0':>6}{'dead':>7}{'Δ loss':>8}{'KL':>7}   with gradient:"
        f"{'FVU':>7}{'Δ loss':>8}{'KL':>7}{'changed':>9}"
    )
    for label, r in results.items():
        sae_cfg = saes[label].cfg
        beta = f"{sae_cfg.beta:g}" if sae_cfg.architecture == "gsae" else "-"
        line = (
            f"{label:<16}{sae_cfg.k:>4}{beta:>5}{r['fvu']:>7.3f}{r['l0']:>6.1f}{r['dead_fraction']:>7.1%}"
            f"{r['delta_lm_loss']:>8.3f}{r['kl']:>7.3f}"
        )
        if "kl_with_gradient" in r:
            line += (
                f"{'':>17}{r['fvu_with_gradient']:>7.3f}{r['delta_lm_loss_with_gradient']:>8.3f}"
                f"{r['kl_with_gradient']:>7.3f}{r['selections_changed']:>9.1%}"
            )
        print(line)

    contexts = held_out_contexts(store, model.tokenizer, args.steer_contexts)
    hook = store.hook_name(None)
    sample = next(iter(store.batches(4096, seed=1)))
    alpha = args.strength * float((sample[0] if isinstance(sample, tuple) else sample).norm(dim=-1).median())
    print(
        f"\nsteering: {args.latents} random latents each, α = {alpha:.1f} ({args.strength} × median ‖x‖), "
        f"{len(contexts)} held-out contexts"
    )
    print(f"{'sae':<16}{'KL':>8}{'Δ log p(top-5 tokens)':>24}")
    generator = torch.Generator().manual_seed(0)
    for label in (f"topk-{args.d_sae}-k32", f"gsae-k32-b{SAEConfig.beta:g}"):  # g-SAE at its default β
        sae = saes[label].cpu().eval()
        latents = torch.randperm(sae.cfg.d_sae, generator=generator)[: args.latents].tolist()
        kl, rise = steering_effect(model, sae, hook, contexts, latents, alpha)
        print(f"{label:<16}{kl:>8.3f}{rise:>24.3f}")


if __name__ == "__main__":
    main()
