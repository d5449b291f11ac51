"""Evaluate a training run's SAEs on held-out text: reconstruction, sparsity and CE loss recovered.

Held-out rule. The run's `config.yaml` names its activation store; the store's manifest names the
model, the hook, the context size, BOS and the corpus it was harvested from. That corpus is
regenerated as the same token stream (`iter_documents` → `iter_contexts`), the contexts the store
holds are skipped (they are checked, token for token, against the store's own copy), and the
next ones are evaluated: text that no SAE of the run was trained on. (A harvest still running is
skipped up to the contexts it plans to store.)

One pass per batch of contexts: the model runs clean, with the hook zero-ablated, and once per
SAE with the hook's activation at positions ≥ 1 replaced by the SAE's reconstruction (SAEs of several
hooks: clean and zero-ablated passes per hook; a transcoder replaces the hook it predicts, its
`hook_name_out`, by its prediction from the hook it reads in the same pass, and L_zero ablates that); inside that
last pass the SAE's input, reconstruction and latents also feed its `MetricsAccumulator`, so the
activation metrics are computed on exactly the tokens the losses are. Only the clean pass runs the
blocks below the hook's; the others resume from the hook's block (`saelab.eval.ce_loss`).

A g-SAE (β > 0) is also evaluated *with* its gradient-aware selection, as it trains: the clean pass
then computes g = ∂L/∂x at the hook (one backward per batch), and a second spliced pass selects each
token's latents with its g. Its eval.json then also holds `<metric>_with_gradient` (FVU, L0, CE
loss, KL…) and `selections_changed`, the fraction of the latents it fired that plain TopK (its
inference without a gradient) would not have.

Results: `run/saes/<label>/eval.json` per SAE, and one line per SAE appended to the run's
`metrics.jsonl`: `{"step": <last training step>, "sae": label, "eval/fvu": …}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from saelab.atomic import atomic_write_json
from saelab.config import config_from_dict
from saelab.errors import SaelabError
from saelab.eval.ce_loss import CELossAccumulator, Transcoding
from saelab.eval.config import EvalConfig
from saelab.eval.metrics import MetricsAccumulator
from saelab.harvest.config import CorpusConfig
from saelab.harvest.corpus import iter_documents
from saelab.harvest.packing import iter_contexts
from saelab.harvest.store import ActivationStore
from saelab.locking import folder_lock
from saelab.models import load_model, resolve_device
from saelab.run_layout import EVAL_FILE, METRICS_FILE, SAE_DIR
from saelab.sae import SparseAutoencoder, load_sae
from saelab.train.run_folder import open_run_store, read_run_config, sae_hook, sae_labels


def evaluate(
    cfg: EvalConfig, model: TransformerBridge | None = None, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Evaluate the SAEs `cfg.saes` (all when empty) of the run `cfg.run`; returns each SAE's eval.json by label."""
    cfg.validate()
    run = Path(cfg.run)
    train_cfg = read_run_config(run)
    labels = sae_labels(run, cfg.saes)
    store = open_run_store(run, train_cfg, verify=False)  # read for its manifest and contexts only
    manifest = store.manifest
    with folder_lock(run, what="job (training or evaluation)"):
        model = model if model is not None else load_model(manifest.model, resolve_device(cfg.device))
        device = next(model.parameters()).device
        saes = {label: load_sae(run / SAE_DIR / label, device) for label in labels}
        reads = {label: sae_hook(sae, train_cfg, store) for label, sae in saes.items()}
        spliced = {label: sae.cfg.hook_name_out or reads[label] for label, sae in saes.items()}
        first_context = max(manifest.n_contexts, manifest.n_contexts_planned)
        first = manifest.first_position  # earlier positions (the BOS, sinks) were never stored nor trained on
        n_contexts = math.ceil(cfg.n_tokens / (manifest.context_size - first))
        contexts = held_out_contexts(store, model.tokenizer, n_contexts)

        metrics = {
            label: MetricsAccumulator(sae.cfg.output_width, sae.cfg.d_sae, device) for label, sae in saes.items()
        }
        gradient_aware = {label: _GradientSelection(sae, device) for label, sae in saes.items() if _uses_gradient(sae)}
        losses = {  # one set of clean and zero-ablated passes per hook that is spliced
            hook: CELossAccumulator(
                model,
                hook,
                {label: _splice(saes[label], metrics[label], reads[label]) for label in saes if spliced[label] == hook},
                first,
                {
                    label + WITH_GRADIENT: gradient_aware[label].reconstruct
                    for label in gradient_aware
                    if spliced[label] == hook
                },
            )
            for hook in dict.fromkeys(spliced.values())
        }
        tokens_per_context = manifest.context_size - first
        bar = tqdm(
            total=len(contexts) * tokens_per_context,
            unit="tok",
            unit_scale=True,
            desc=f"eval {len(saes)} SAE(s) at {', '.join(losses)}",
            disable=not progress,
        )
        with bar:
            for batch in contexts.split(cfg.batch_size):
                for accumulator in losses.values():
                    accumulator.update(batch.to(device))
                bar.update(len(batch) * tokens_per_context)
        ce = {hook: accumulator.result() for hook, accumulator in losses.items()}

        step = train_cfg.n_steps
        held_out = {
            "store": str(train_cfg.store),
            "corpus": manifest.config.get("corpus"),
            "first_context": first_context,
            "n_contexts": len(contexts),
            "context_size": manifest.context_size,
            "positions": f"{first}..{manifest.context_size - 1}",
            "n_tokens": len(contexts) * tokens_per_context,
        }
        results = {}
        for label, sae in saes.items():
            hook = spliced[label]
            results[label] = {
                "sae": label,
                "architecture": sae.cfg.architecture,
                "d_sae": sae.cfg.d_sae,
                "model": manifest.model,
                "hook": hook,
                **({"hook_in": reads[label]} if hook != reads[label] else {}),
                "step": step,
                "held_out": held_out,
                **metrics[label].result(),
                **ce[hook].summary(label),
            }
            if label in gradient_aware:
                results[label] |= gradient_aware[label].result() | ce[hook].summary(label, WITH_GRADIENT)
            atomic_write_json(run / SAE_DIR / label / EVAL_FILE, results[label])
        _append_metrics(run, step, results)
    return results


def held_out_contexts(store: ActivationStore, tokenizer: Any, n_contexts: int) -> torch.Tensor:
    """The `n_contexts` contexts `[n, context_size]` (int64) that follow the store's in its corpus stream.

    Fewer when the corpus runs out first; none at all is a SaelabError. The contexts skipped must
    equal the store's own, token for token, or the text could not be proven held out.
    """
    manifest = store.manifest
    corpus = config_from_dict(CorpusConfig, manifest.config["corpus"], prefix="corpus")
    prepend_bos = manifest.config.get("prepend_bos", True)
    stream = iter_contexts(iter_documents(corpus), tokenizer, manifest.context_size, prepend_bos)
    for index, context in enumerate(islice(stream, manifest.n_contexts)):
        if context != store.context_tokens(index).tolist():
            raise SaelabError(
                f"the corpus no longer yields the contexts of {store.path} (context {index} differs: another "
                "Python, corpus or tokenizer?), so held-out text cannot be told apart from training text; "
                "evaluate where the store was harvested"
            )
    # A harvest still running goes on to n_contexts_planned: skip those too.
    ahead = max(0, manifest.n_contexts_planned - manifest.n_contexts)
    contexts = list(islice(stream, ahead, ahead + n_contexts))
    if not contexts:
        raise SaelabError(
            f"the corpus has no text left after the {manifest.n_contexts_planned:,} contexts of {store.path}; "
            "evaluate on a store harvested from less than the whole corpus"
        )
    return torch.tensor(contexts, dtype=torch.long)


def _splice(
    sae: SparseAutoencoder, metrics: MetricsAccumulator, reads: str
) -> Callable[[torch.Tensor], torch.Tensor] | Transcoding:
    """`sae` spliced in, feeding what it reconstructs, its reconstruction and its latents to `metrics` on the
    way: x → x̂ at its hook, or, for a transcoder, the rows at `reads` → its prediction of its target's."""

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        out = sae(x)
        metrics.update(x, out.reconstruction, out.latents)
        return out.reconstruction

    def predict(inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = sae(inputs)
        metrics.update(target, out.reconstruction, out.latents)
        return out.reconstruction

    return Transcoding(reads, predict) if sae.transcoder else reconstruct


WITH_GRADIENT = "_with_gradient"
_GRADIENT_METRICS = ("fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction")


def _uses_gradient(sae: SparseAutoencoder) -> bool:
    return sae.selects_with_gradient(sae.cfg)


class _GradientSelection:
    """A g-SAE spliced in with its gradient-aware selection: its metrics, and how often it departs from TopK."""

    def __init__(self, sae: SparseAutoencoder, device: torch.device) -> None:
        self.sae = sae
        self.metrics = MetricsAccumulator(sae.cfg.d_in, sae.cfg.d_sae, device)
        self.fired, self.changed = 0, 0

    def reconstruct(self, x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """x, gradient: [n, d_in] → x̂ with latents chosen by activation and gradient."""
        out = self.sae(x, gradient)
        fired = out.latents != 0
        plain = self.sae.select(out.pre_activations)  # TopK on the same u: no second encoder product
        self.fired += int(fired.sum())
        self.changed += int((fired & (plain == 0)).sum())
        self.metrics.update(x, out.reconstruction, out.latents)
        return out.reconstruction

    def result(self) -> dict[str, float]:
        measured = self.metrics.result()
        found = {f"{key}{WITH_GRADIENT}": measured[key] for key in _GRADIENT_METRICS}
        return found | {"selections_changed": self.changed / max(self.fired, 1)}


def _append_metrics(run: Path, step: int, results: dict[str, dict[str, Any]]) -> None:
    """One line per SAE in the run's metrics.jsonl: its scalar results as `eval/<name>`."""
    with open(run / METRICS_FILE, "a") as log:
        for label, result in results.items():
            scalars = {
                f"eval/{key}": value
                for key, value in result.items()
                if key not in ("step", "d_sae") and (value is None or isinstance(value, int | float))
            }
            log.write(json.dumps({"step": step, "sae": label, **scalars}) + "\n")
