"""`saelab probe`: sparse probing and first-letter absorption of a training run's SAEs, saved beside each.

The model's activations (the labelled contexts' tokens, the single-token words) are computed once per
hook and shared by every SAE that reads it. Per SAE, `saes/<label>/probing.json` holds

    sparse_probing   {"concepts": {concept: {"dense", "k1", "k2", …, "n_train", "n_test"}}, "mean": {…}}
    absorption       {"mean_absorption_rate", "mean_main_miss_rate", "letters": [...], "thresholds"}

(the tasks run), with the model, the hook and the settings.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from saelab.atomic import atomic_write_json
from saelab.eval.absorption import (
    absorption,
    absorption_summary,
    fit_letter_probes,
    single_token_words,
    word_activations,
)
from saelab.eval.concepts import labelled_contexts
from saelab.eval.config import ProbeConfig
from saelab.eval.probing import ConceptTokens, concept_tokens, sparse_probing, summary
from saelab.locking import folder_lock
from saelab.models import load_model, resolve_device
from saelab.run_layout import PROBING_FILE, SAE_DIR
from saelab.sae import SparseAutoencoder, load_sae
from saelab.train.run_folder import open_run_store, read_run_config, sae_hook, sae_labels


def probe(cfg: ProbeConfig, model: TransformerBridge | None = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Run `cfg.tasks` on the SAEs `cfg.saes` (all when empty) of the run `cfg.run`; returns each probing.json."""
    cfg.validate()
    run = Path(cfg.run)
    train_cfg = read_run_config(run)
    labels = sae_labels(run, cfg.saes)
    store = open_run_store(run, train_cfg, verify=False)
    with folder_lock(run, what="job (training or evaluation)"):
        model = model if model is not None else load_model(store.manifest.model, resolve_device(cfg.device))
        device = next(model.parameters()).device
        saes = {label: load_sae(run / SAE_DIR / label, device) for label in labels}
        hooks = {label: sae_hook(sae, train_cfg, store) for label, sae in saes.items()}
        contexts = labelled_contexts(model.tokenizer, cfg.n_code, cfg.n_prose) if "sparse_probing" in cfg.tasks else []
        words = single_token_words(model.tokenizer, cfg.max_words, cfg.seed) if "absorption" in cfg.tasks else []
        results = {}
        for hook in dict.fromkeys(hooks.values()):
            first = store.manifest.first_position
            tokens = concept_tokens(model, hook, contexts, first, progress) if contexts else None
            word_x = word_activations(model, hook, [token_id for token_id, _ in words], progress) if words else None
            letter_probes = fit_letter_probes(word_x, [word for _, word in words], cfg.seed) if words else None
            for label in [label for label, h in hooks.items() if h == hook]:
                result = {"sae": label, "model": store.manifest.model, "hook": hook, "settings": asdict(cfg)}
                if tokens is not None:
                    result["sparse_probing"] = _sparse_probing(cfg, tokens, saes[label], len(contexts))
                if letter_probes is not None:
                    found = absorption(word_x, letter_probes, saes[label])
                    result["absorption"] = absorption_summary(found) | {"n_words": len(words)}
                atomic_write_json(run / SAE_DIR / label / PROBING_FILE, result)
                results[label] = result
    return results


def _sparse_probing(cfg: ProbeConfig, tokens: ConceptTokens, sae: SparseAutoencoder, n_contexts: int) -> dict:
    latents = sae.encode_rows(tokens.x)
    concepts = sparse_probing(tokens, latents, cfg.ks, cfg.max_per_class, cfg.seed)
    return {"concepts": concepts, "mean": summary(concepts, cfg.ks), "n_contexts": n_contexts}
