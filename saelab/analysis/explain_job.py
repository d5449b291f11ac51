"""`saelab explain`: explain and score latents of a training run's SAEs, resumably, beside their feature stores.

Per SAE: `explanations.jsonl` (the LLM's) and `token_summaries.jsonl` (the token-summary explainer's)
each gain a line per latent explained and per latent scored (a killed run resumes where it stopped; the
dashboard shows what is done so far), and `autointerp.json` gets the summary per explainer: detection
and fuzzing balanced accuracy, each beside the shuffled-explanation baseline, with bootstrap 95 %
intervals, and how many labels beat the shuffled control (`saelab.analysis.autointerp`, `label_test`).
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from saelab.analysis.autointerp import (
    NonFiringPool,
    autointerp_summary,
    explain_latents,
    score_latents,
    summarize_latents,
)
from saelab.analysis.chat_models import ChatModel, load_chat_model
from saelab.analysis.config import NO_EXPLAINER, ExplainConfig
from saelab.analysis.feature_store import FeatureStore
from saelab.analysis.token_summary import EXPLAINER as TOKEN_SUMMARY
from saelab.atomic import atomic_write_json
from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore
from saelab.locking import folder_lock
from saelab.models import SMOLLM2_SPEC, resolve_device
from saelab.run_layout import AUTOINTERP_FILE, EXPLANATIONS_FILE, FEATURES_FILE, SAE_DIR, TOKEN_SUMMARIES_FILE
from saelab.sae import load_sae
from saelab.train.run_folder import open_run_store, read_run_config, sae_labels


def explain(cfg: ExplainConfig, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Explain and score the latents `cfg` names; returns each SAE's autointerp.json."""
    cfg.validate()
    run = Path(cfg.run)
    train_cfg = read_run_config(run)
    labels = sae_labels(run, cfg.saes)
    activations = open_run_store(run, train_cfg, verify=False)
    device = resolve_device(cfg.device)
    explainer = None if cfg.explainer == NO_EXPLAINER else load_chat_model(cfg.explainer, cfg.endpoint_model, device)
    if explainer is not None and cfg.scorer in ("", cfg.explainer):
        scorer = explainer
    else:
        scorer = load_chat_model(cfg.scorer or SMOLLM2_SPEC, cfg.endpoint_model, device)
    return {
        label: _explain_sae(cfg, run / SAE_DIR / label, activations, explainer, scorer, device, progress)
        for label in labels
    }


def _explain_sae(
    cfg: ExplainConfig,
    folder: Path,
    activations: ActivationStore,
    explainer: ChatModel | None,
    scorer: ChatModel,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    """One SAE: the LLM's explanations and the token summaries, each file scored; its autointerp.json, whose
    top-level scores are the default explainer's (`default_explainer`) and `explainers` holds each's."""
    if not (folder / FEATURES_FILE).is_file():
        raise SaelabError(f"{folder} has no feature store; make it with `saelab analyze run={folder.parent.parent}`")
    with folder_lock(folder, what="explain job"), FeatureStore(folder / FEATURES_FILE) as store:
        sae = load_sae(folder, device)
        latents = chosen_latents(store, cfg)
        pool = NonFiringPool(store, activations, sae, cfg.seed)
        settings = {"seed": cfg.seed, "n_explain": cfg.n_explain, "n_score": cfg.n_score}
        explainers: dict[str, dict[str, Any]] = {}
        if explainer is not None:
            path = folder / EXPLANATIONS_FILE
            explain_latents(path, store, latents, explainer, cfg.n_explain, progress)
            explained = score_latents(path, store, latents, scorer, pool, settings, progress)
            explainers[explainer.name] = autointerp_summary(explained, latents, cfg.seed)
        if cfg.token_summary:
            path = folder / TOKEN_SUMMARIES_FILE
            summarize_latents(path, store, latents, cfg.n_explain)
            summarized = score_latents(path, store, latents, scorer, pool, settings, progress)
            explainers[TOKEN_SUMMARY] = autointerp_summary(summarized, latents, cfg.seed)
        best = default_explainer(explainers)
        summary = explainers[best] | {"explainer": best, "scorer": scorer.name, "explainers": explainers}
        summary |= {"latents": latents, "settings": asdict(cfg)}
        atomic_write_json(folder / AUTOINTERP_FILE, summary)
    return summary


def default_explainer(explainers: dict[str, dict[str, Any]]) -> str:
    """The explainer whose labels the SAE is summarised by: the highest mean detection score, the first (the
    LLM) on a tie or where none was scored. With the weak offline LLM that is usually the token summary."""
    return max(explainers, key=lambda name: (explainers[name].get("detection") or {}).get("mean", -1.0))


def chosen_latents(store: FeatureStore, cfg: ExplainConfig) -> list[int]:
    """`cfg.latents`, or a random `cfg.n_latents` (sorted) of the latents that fired on enough tokens to have
    `n_explain` contexts to show and `n_score` more to test."""
    if cfg.latents:
        outside = [latent for latent in cfg.latents if latent >= store.n_latents]
        if outside:
            raise SaelabError(f"latents: {outside} are not in the SAE; it has latents 0..{store.n_latents - 1}")
        return sorted(set(cfg.latents))
    n_tokens = store.meta.get("n_tokens") or 0
    enough = [row[0] for row in store.summary_table() if row[1] * n_tokens >= cfg.n_explain + cfg.n_score]
    if not enough:
        needed = cfg.n_explain + cfg.n_score
        raise SaelabError(f"no latent of {store.path} fired on {needed} tokens; nothing to explain")
    if cfg.n_latents == 0 or cfg.n_latents >= len(enough):
        return enough
    return sorted(random.Random(cfg.seed).sample(enough, cfg.n_latents))
