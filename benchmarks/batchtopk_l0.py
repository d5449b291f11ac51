"""BatchTopK against TopK at exactly equal L0 on held-out SmolLM2 text (the BatchTopK paper's comparison).

BatchTopK's inference threshold θ is the training batches' cutoff. On the default run's held-out text
more pre-activations clear it than on the training tokens (L0 35.1 held out, 30.8 on the store, for
k 32), so the plain `saelab eval` table compares it with TopK at unequal L0. Here θ is fitted
(`BatchTopKSAE.fit_threshold`) on held-out text that follows the evaluation's, so the evaluated text
is never used to choose it, and a second time on the evaluated text itself, for exactly equal L0.
Every row is then evaluated by `saelab.eval.evaluate` on the same held-out tokens as `saelab eval`.

    python benchmarks/batchtopk_l0.py [--run runs/smollm2-135m/train] [--tokens 16384] [--fit-tokens 16384]
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import tempfile
from pathlib import Path

import torch

from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import evaluate, held_out_contexts
from saelab.harvest.activations import activations
from saelab.models import load_model, parse_hook
from saelab.run_layout import CONFIG_FILE, SAE_DIR
from saelab.sae import BatchTopKSAE, load_sae, save_sae
from saelab.train.run_folder import open_run_store, read_run_config, sae_hook, sae_labels


def hook_activations(model, contexts: torch.Tensor, hook: str, first: int, batch_size: int = 8) -> torch.Tensor:
    """The activations [n, d_model] at `hook` of `contexts`' positions ≥ `first`, as the store holds them."""
    hooks = [parse_hook(hook, model.cfg.n_layers)]
    rows = [activations(model, batch, hooks)[hook][:, first:].float() for batch in contexts.split(batch_size)]
    return torch.cat(rows).flatten(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/smollm2-135m/train")
    parser.add_argument("--tokens", type=int, default=16_384, help="held-out tokens evaluated (saelab eval's default)")
    parser.add_argument("--fit-tokens", type=int, default=16_384, help="held-out tokens after them that fit θ")
    args = parser.parse_args()

    run = Path(args.run)
    train_cfg = read_run_config(run)
    store = open_run_store(run, train_cfg, verify=False)
    saes = {label: load_sae(run / SAE_DIR / label, "cpu") for label in sae_labels(run, [])}
    compared = {label: sae for label, sae in saes.items() if sae.cfg.architecture in ("topk", "batchtopk")}
    model = load_model(store.manifest.model, "cpu")
    first, per_context = store.manifest.first_position, store.manifest.rows_per_context
    n_eval, n_fit = math.ceil(args.tokens / per_context), math.ceil(args.fit_tokens / per_context)
    contexts = held_out_contexts(store, model.tokenizer, n_eval + n_fit)
    evaluated, fitting = contexts[:n_eval], contexts[n_eval:]

    thresholds = {}
    for label, sae in list(compared.items()):
        if isinstance(sae, BatchTopKSAE):
            hook = sae_hook(sae, train_cfg, store)
            thresholds[label] = float(sae.threshold[0])
            for suffix, text in (("-fit-after", fitting), ("-fit-on-eval", evaluated)):
                fitted = copy.deepcopy(sae)
                fitted.cfg.name = label + suffix
                thresholds[fitted.cfg.name] = fitted.fit_threshold(hook_activations(model, text, hook, first))
                compared[fitted.cfg.name] = fitted

    with tempfile.TemporaryDirectory() as tmp:
        copy_run = Path(tmp) / "run"
        (copy_run / SAE_DIR).mkdir(parents=True)
        shutil.copy(run / CONFIG_FILE, copy_run / CONFIG_FILE)
        for label, sae in compared.items():
            save_sae(sae, copy_run / SAE_DIR / label)
        results = evaluate(EvalConfig(run=str(copy_run), n_tokens=args.tokens, device="cpu"), model=model)

    print(
        f"\n{run}: held-out {results[next(iter(results))]['n_tokens']:,} tokens evaluated; "
        f"θ fitted on the {len(fitting) * per_context:,} held-out tokens after them, or on the evaluated ones"
    )
    print(f"{'sae':<36}{'θ':>7}{'L0':>7}{'FVU':>7}{'CE rec.':>9}{'Δ loss':>8}{'KL':>7}")
    for label, r in results.items():
        theta = f"{thresholds[label]:.3f}" if label in thresholds else "-"
        print(
            f"{label:<36}{theta:>7}{r['l0']:>7.1f}{r['fvu']:>7.3f}{r['ce_loss_recovered']:>9.1%}"
            f"{r['delta_lm_loss']:>8.3f}{r['kl']:>7.3f}"
        )


if __name__ == "__main__":
    main()
