"""A steering experiment: features × coefficients × prompts, each cell measured against the unsteered model.

For each prompt (BOS + its tokens, P positions), the model runs once unsteered (the baseline) and,
for each feature and coefficient, once with the intervention (see `SteerConfig` for the modes). A cell
records:

    kl                 D_KL(p_steered ‖ p_base) = Σ_v p_steered(v) (log p_steered(v) − log p_base(v)), nats,
                       of the next-token distribution at the last prompt position (P − 1)
    target_logprob     log p_steered(t) there, per target token t; delta_logprob: minus log p_base(t)
    activation_*       latent f of the SAE at its own hook, after the interventions there, at position
                       P − 1 (`activation_steered`, `activation_baseline`) and averaged over the
                       generated tokens the model read (`activation_generated`, `..._baseline`; None
                       without any). The hook is the SAE's: steering at a later hook leaves it unchanged,
                       and with `positions: generated` the prompt's numbers are the baseline's by design.
    generation         `max_new_tokens` tokens continued from the prompt while steered (same seed for every
                       cell, so sampling differs between cells only through the steering)

Files, each written under a temporary name and renamed into place: `run/steer/<name>.jsonl` (one row per
cell), `<name>.html` (target log-probability against coefficient per feature) and `<name>.yaml` (the config).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.analysis.feature_store import FeatureStore
from saelab.atomic import atomic_write_text
from saelab.config import save_config
from saelab.errors import ConfigError, SaelabError
from saelab.models import load_model, resolve_device
from saelab.run_layout import FEATURES_FILE, SAE_DIR
from saelab.sae import SparseAutoencoder, load_sae
from saelab.steer.config import SteerConfig
from saelab.steer.figure import steering_figure
from saelab.steer.generation import generate
from saelab.steer.interventions import Intervention, check_feature, feature_intervention
from saelab.steer.steering import check_hook, steer
from saelab.train.run_folder import open_run_store, read_run_config, sae_hook, sae_labels

STEER_DIR = "steer"


@dataclass
class SteeringResult:
    rows: list[dict[str, Any]]
    jsonl: Path
    figure: Path
    config: Path


def run_steering(cfg: SteerConfig, model: Any = None, progress: bool = True) -> SteeringResult:
    """Run the sweep `cfg` describes and write its files; returns the rows (one per cell) and the paths."""
    cfg.validate()
    run = Path(cfg.run)
    train_cfg = read_run_config(run)
    (label,) = sae_labels(run, [cfg.sae])
    device = resolve_device(cfg.device) if model is None else next(model.parameters()).device
    sae = load_sae(run / SAE_DIR / label, device)
    for i, feature in enumerate(cfg.features):
        try:
            check_feature(sae, feature)
        except SaelabError as error:
            raise ConfigError(f"features[{i}]: {error}") from error
    scale = "none" if cfg.mode == "ablate" else cfg.scale  # ablating sets 0 whatever the scale
    scales = feature_scales(run / SAE_DIR / label, cfg.features, scale, sae)

    model_spec, own_hook = sae.cfg.model_name, sae.cfg.hook_name
    if not model_spec or not own_hook:  # an SAE that does not say: the run's activation store does
        store = open_run_store(run, train_cfg, verify=False)
        model_spec, own_hook = model_spec or store.manifest.model, own_hook or sae_hook(sae, train_cfg, store)
    model = model if model is not None else load_model(model_spec, device)
    hook = cfg.hook or sae.cfg.hook_name_out or own_hook  # a transcoder's direction lives at its output hook
    try:
        check_hook(model, hook)
    except SaelabError as error:
        raise ConfigError(f"hook: {error}") from error
    if cfg.mode != "add" and hook != own_hook:
        raise ConfigError(f"hook: mode {cfg.mode} edits the SAE's latents, so it must be the SAE's hook {own_hook}")
    targets = target_token_ids(model.tokenizer, cfg.targets)

    device = next(model.parameters()).device
    prompts = [model.to_tokens(prompt).to(device) for prompt in cfg.prompts]
    rows = sweep_rows(cfg, label, model, sae, own_hook, hook, prompts, scales, targets, progress)

    jsonl, html, yaml = (run / STEER_DIR / f"{cfg.name}.{suffix}" for suffix in ("jsonl", "html", "yaml"))
    result = SteeringResult(rows, jsonl, html, yaml)
    atomic_write_text(result.jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    title = f"{label} at {hook}: {cfg.mode}, scale {cfg.scale}, positions {cfg.positions}"
    figure = steering_figure(rows, cfg.targets, title)
    atomic_write_text(result.figure, figure.to_html(include_plotlyjs=True, full_html=True))
    save_config(cfg, result.config)
    return result


def sweep_rows(
    cfg: SteerConfig,
    label: str,
    model: Any,
    sae: SparseAutoencoder,
    own_hook: str,
    hook: str,
    prompts: list[torch.Tensor],
    scales: dict[int, float],
    targets: dict[str, int] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The sweep itself, writing nothing: each prompt (`prompts[i]`: cfg.prompts[i]'s tokens, [1, P]) once
    unsteered, then one row per (feature, coefficient, prompt) cell (module docstring), strength = coefficient
    × `scales[feature]`. `saelab steer` and the dashboard's steering playground both call it."""
    coefficients = [0.0] if cfg.mode == "ablate" else cfg.coefficients
    cells = list(product(cfg.features, coefficients, range(len(prompts))))
    bar = tqdm(total=len(prompts) + len(cells), unit="cell", disable=not progress, desc=f"steer {label}")
    baselines = []
    for tokens in prompts:
        baselines.append(_measure(model, sae, own_hook, tokens, [], cfg))
        bar.update()
    rows = []
    for feature, coefficient, p in cells:
        strength = coefficient * scales[feature]
        intervention = feature_intervention(
            sae, cfg.mode, feature, strength, hook, cfg.positions, cfg.include_first_position
        )
        base = baselines[p]
        cell = _measure(model, sae, own_hook, base["tokens"], [intervention], cfg)
        rows.append(_row(cfg, label, hook, feature, coefficient, scales[feature], p, base, cell, targets or {}, model))
        bar.update()
    bar.close()
    return rows


def feature_scales(
    sae_folder: Path, features: list[int], scale: str, sae: SparseAutoencoder | None = None
) -> dict[int, float]:
    """Each feature's coefficient multiplier: its max activation in the SAE's feature store, or 1.

    With `sae`, the store must have been made from it (same d_sae and input scale), not from an older SAE."""
    if scale == "none":
        return {feature: 1.0 for feature in features}
    path = sae_folder / FEATURES_FILE
    remake = f"`saelab analyze run={sae_folder.parent.parent} saes=[{sae_folder.name}]`"
    if not path.is_file():
        raise ConfigError(
            f"scale: max_activation reads each latent's max activation from {path}, which does not exist; "
            f"make it with {remake}, or set scale=none"
        )
    scales = {}
    with FeatureStore(path) as store:
        if sae is not None:
            stored = (store.meta.get("d_sae"), store.meta.get("input_scale"))
            if stored[0] != sae.cfg.d_sae or not math.isclose(stored[1] or 0.0, float(sae.input_scale), rel_tol=1e-6):
                here = f"d_sae {sae.cfg.d_sae}, input scale {float(sae.input_scale):g}"
                raise ConfigError(
                    f"scale: {path} was made from another SAE (d_sae {stored[0]}, input scale {stored[1]}) than "
                    f"{sae_folder} ({here}); remake it with {remake}"
                )
        for i, feature in enumerate(features):
            maximum = store.feature(feature).max_activation
            if maximum <= 0:
                raise ConfigError(
                    f"features[{i}]: latent {feature} never fired in {path}, so scale=max_activation cannot size it; "
                    "pick a live latent or set scale=none"
                )
            scales[feature] = maximum
    return scales


def target_token_ids(tokenizer: Any, targets: list[str]) -> dict[str, int]:
    """`{target: token id}`; a target that is not exactly one token is a ConfigError that shows its pieces."""
    ids = {}
    for i, target in enumerate(targets):
        pieces = tokenizer.encode(target, add_special_tokens=False)
        if len(pieces) != 1:
            shown = [tokenizer.decode([piece]) for piece in pieces]
            raise ConfigError(
                f"targets[{i}]: {target!r} is {len(pieces)} tokens {shown}; name one token, e.g. {shown[0]!r}"
            )
        ids[target] = pieces[0]
    return ids


@torch.inference_mode()
def _measure(
    model: Any,
    sae: SparseAutoencoder,
    sae_hook_name: str,
    tokens: torch.Tensor,
    interventions: list[Intervention],
    cfg: SteerConfig,
) -> dict[str, Any]:
    """One prompt under `interventions`: next-token log-probabilities at its last position, the SAE's
    latents there and over the generated tokens, and the generation."""
    prompt_length = tokens.shape[1]
    generator = torch.Generator().manual_seed(cfg.seed)
    with steer(model, interventions, prompt_length=prompt_length, observe=[sae_hook_name]) as steering:
        logprobs = torch.log_softmax(model(tokens)[0, -1].float(), dim=-1)
        prompt_latents = sae.encode(steering.outputs[sae_hook_name][0, prompt_length - 1 :].float())[0]
        sequence = generate(
            model, tokens, cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_k, generator=generator
        )
        read = steering.outputs[sae_hook_name][0, prompt_length:]  # the last pass: generated tokens but the newest
        generated_latents = sae.encode(read.float()) if len(read) else None
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "prompt_latents": prompt_latents,
        "generated_latents": generated_latents,
        "generated_ids": sequence[0, prompt_length:].tolist(),
    }


def _row(
    cfg: SteerConfig,
    label: str,
    hook: str,
    feature: int,
    coefficient: float,
    scale: float,
    prompt_index: int,
    base: dict[str, Any],
    cell: dict[str, Any],
    targets: dict[str, int],
    model: Any,
) -> dict[str, Any]:
    steered, baseline = cell["logprobs"], base["logprobs"]
    kl = float((steered.exp() * (steered - baseline)).sum())

    def mean_generated(measured: dict[str, Any]) -> float | None:
        latents = measured["generated_latents"]
        return None if latents is None else float(latents[:, feature].mean())

    return {
        "sae": label,
        "hook": hook,
        "mode": cfg.mode,
        "positions": cfg.positions,
        "feature": feature,
        "coefficient": coefficient,
        "scale": scale,
        "strength": coefficient * scale,
        "prompt_index": prompt_index,
        "prompt": cfg.prompts[prompt_index],
        "kl": max(kl, 0.0),  # ≥ 0 in exact arithmetic; rounding can give −1e-9
        "target_logprob": {t: float(steered[i]) for t, i in targets.items()},
        "baseline_logprob": {t: float(baseline[i]) for t, i in targets.items()},
        "delta_logprob": {t: float(steered[i] - baseline[i]) for t, i in targets.items()},
        "activation_steered": float(cell["prompt_latents"][feature]),
        "activation_baseline": float(base["prompt_latents"][feature]),
        "activation_generated": mean_generated(cell),
        "activation_generated_baseline": mean_generated(base),
        "generation": model.tokenizer.decode(cell["generated_ids"]),
        "baseline_generation": model.tokenizer.decode(base["generated_ids"]),
        "generated_ids": cell["generated_ids"],
    }
