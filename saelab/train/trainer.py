"""The training loop: batches from a source, every SAE of the sweep stepped on each, checkpoints, logs.

Resumable bit for bit: a checkpoint holds each SAE's weights and buffers, its Adam state and its
dead-latent counters, and the position in the data (epoch, batch); epoch `e` is the source shuffled
with seed `seed + e`, so the resumed run reads exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.atomic import atomic_write_json, removed_on_failure
from saelab.config import config_changes, config_identity, load_config, save_config
from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore
from saelab.locking import folder_lock
from saelab.models import resolve_device
from saelab.run_layout import CONFIG_FILE, SAE_DIR, SUMMARY_FILE
from saelab.sae import GBASAE, SparseAutoencoder, build_sae, save_sae
from saelab.sae.config import default_lr
from saelab.train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from saelab.train.config import TrainConfig
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.initialization import geometric_median, input_scale
from saelab.train.metrics_log import MetricsLog
from saelab.train.sources import BatchSource, StoreSource
from saelab.train.step import KernelOptions, train_step

_INIT_SEED_OFFSET = 1_000_003  # the initialisation sample is drawn apart from the training epochs
_NOT_IDENTITY = ("out", "device", "wandb", "keep_checkpoints", "log_every_steps")
_SUMMARY_STEPS = 20


@dataclass
class SAEState:
    """Everything about one SAE of the sweep that a checkpoint must restore."""

    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    tracker: DeadLatentTracker
    lr: float
    recent: list[dict[str, float]] = field(default_factory=list)


def train(
    cfg: TrainConfig, source: BatchSource | None = None, resume: bool = False, progress: bool = True
) -> dict[str, SparseAutoencoder]:
    """Train every SAE of `cfg.saes` into `cfg.out`; returns them by label (also saved under `saes/`)."""
    cfg.validate()
    out = Path(cfg.out)
    source, provenance = _open_source(cfg, source)  # bad input fails before the run folder exists
    created = not out.exists()  # …and what fails later (the batch size for this store…) removes it again
    with folder_lock(out, what="training run"), removed_on_failure(out, created, _has_results):
        _prepare_run_folder(out, cfg, resume)
        device = torch.device(resolve_device(cfg.device))
        states = _build_states(cfg, source.d_in, provenance, device)
        position = _restore_or_initialize(out, cfg, source, states, resume)
        log = MetricsLog(out, cfg.wandb, _identity(cfg), resume_step=position["step"] if resume else None)
        try:
            _run_steps(out, cfg, source, states, position, log, device, progress)
        finally:
            log.close()
        return _finish(out, cfg, states)


def _open_source(cfg: TrainConfig, source: BatchSource | None) -> tuple[BatchSource, dict[str, str]]:
    if source is not None:
        return source, {"hook_name": cfg.hook or "", "model_name": ""}
    store = ActivationStore(cfg.store)
    if not store.complete:  # its shuffle would change as shards arrive: no run could resume or be repeated
        raise SaelabError(
            f"the activation store {cfg.store} is incomplete ({store.n_contexts:,} of "
            f"{store.manifest.n_contexts_planned:,} contexts): its harvest is running or was stopped; "
            "finish it (rerun the same saelab harvest), then train"
        )
    store_source = StoreSource(store, cfg.hook)
    return store_source, {"hook_name": store_source.hook, "model_name": store.manifest.model}


def _has_results(out: Path) -> bool:
    """A checkpoint or a saved SAE: something a rerun continues from or a later stage reads."""
    return bool(complete_checkpoints(out)) or (out / SAE_DIR).exists()


def _identity(cfg: TrainConfig) -> dict[str, Any]:
    return config_identity(cfg, ignore=_NOT_IDENTITY)


def _prepare_run_folder(out: Path, cfg: TrainConfig, resume: bool) -> None:
    saved = out / CONFIG_FILE
    if saved.exists() and not resume:
        raise SaelabError(f"{out} already holds a training run; pass --resume to continue it, or choose a new `out`")
    if saved.exists():
        if changed := config_changes(_identity(load_config(TrainConfig, saved)), _identity(cfg)):
            raise SaelabError(f"{out} was trained with a different config ({'; '.join(changed)}); resume it unchanged")
        return
    save_config(cfg, saved)


def _build_states(cfg: TrainConfig, d_in: int, provenance: dict[str, str], device: torch.device) -> list[SAEState]:
    states = []
    for index, sae_cfg in enumerate(cfg.saes):
        sae_cfg.d_in = d_in
        sae_cfg.hook_name = sae_cfg.hook_name or provenance["hook_name"]
        sae_cfg.model_name = sae_cfg.model_name or provenance["model_name"]
        generator = torch.Generator().manual_seed(_init_seed(cfg.seed, index))
        sae = build_sae(sae_cfg, generator=generator).to(device)
        lr = cfg.lr if cfg.lr is not None else default_lr(sae_cfg.d_sae)
        trainable = [p for p in sae.parameters() if p.requires_grad]
        # fused: one kernel over all parameters (on the CPU ~6× faster than the per-tensor loop)
        optimizer = torch.optim.Adam(trainable, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
        tracker = DeadLatentTracker(sae_cfg.d_sae, cfg.resolved_dead_tokens())
        states.append(SAEState(sae, optimizer, tracker, lr))
    return states


def _init_seed(seed: int, index: int) -> int:
    """A seed for SAE `index`'s weights, hashed so it never equals a seed that drew the data.

    (With plain seed 0, an SAE trained on synthetic data drawn with seed 0 starts with its decoder
    on the true features.)
    """
    digest = hashlib.blake2b(f"saelab/sae-init/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _restore_or_initialize(
    out: Path, cfg: TrainConfig, source: BatchSource, states: list[SAEState], resume: bool
) -> dict[str, int]:
    checkpoints = complete_checkpoints(out) if resume else []
    if not checkpoints:
        _initialize(cfg, source, states)
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    checkpoint = load_checkpoint(checkpoints[-1])
    for state in states:
        saved = checkpoint["saes"][state.sae.cfg.label]
        state.sae.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.tracker.tokens_since_fired.copy_(saved["tokens_since_fired"])
        state.recent = saved["recent"]
    return checkpoint["position"]


@torch.no_grad()
def _initialize(cfg: TrainConfig, source: BatchSource, states: list[SAEState]) -> None:
    """Set every SAE's input scale, start b_dec at the geometric median of a sample, calibrate GBA's biases."""
    if source.n_batches(cfg.batch_size) == 0:
        raise SaelabError(f"the data has fewer rows than one batch of {cfg.batch_size}; lower batch_size")
    rows, sample = 0, []
    for x, _ in source.batches(cfg.batch_size, seed=cfg.seed + _INIT_SEED_OFFSET):
        sample.append(x.float())
        rows += len(x)
        if rows >= cfg.init_sample_rows:
            break
    sample = torch.cat(sample)[: cfg.init_sample_rows]
    scale = input_scale(sample) if cfg.normalize_activations else 1.0
    median = geometric_median(sample * scale)
    for state in states:
        state.sae.input_scale.fill_(scale)
        state.sae.b_dec.copy_(median)
        if isinstance(state.sae, GBASAE):
            state.sae.calibrate_biases(sample)


def _learning_rate(base: float, step: int, cfg: TrainConfig) -> float:
    """Constant, then linear decay to zero over the last `lr_decay_fraction` of the steps."""
    decay_steps = cfg.lr_decay_fraction * cfg.n_steps
    return base if decay_steps == 0 else base * min(1.0, (cfg.n_steps - step) / decay_steps)


def _run_steps(
    out: Path,
    cfg: TrainConfig,
    source: BatchSource,
    states: list[SAEState],
    position: dict[str, int],
    log: MetricsLog,
    device: torch.device,
    progress: bool,
) -> None:
    needs_gradients = any(state.sae.cfg.architecture == "gsae" for state in states)
    kernels = KernelOptions(cfg.encoder_tile, torch.bfloat16 if cfg.dtype == "bfloat16" else None)
    k_aux = cfg.k_aux if cfg.k_aux is not None else source.d_in // 2
    batches = source.batches(cfg.batch_size, cfg.seed + position["epoch"], position["batch_in_epoch"], needs_gradients)
    bar = tqdm(
        total=cfg.n_steps * cfg.batch_size,
        initial=position["step"] * cfg.batch_size,
        unit="tok",
        unit_scale=True,
        desc="train",
        disable=not progress,
    )
    started, start_step = time.perf_counter(), position["step"]
    with bar:
        while position["step"] < cfg.n_steps:
            batch = next(batches, None)
            if batch is None:  # end of an epoch: reshuffle with the next epoch's seed
                position.update(epoch=position["epoch"] + 1, batch_in_epoch=0)
                batches = source.batches(cfg.batch_size, cfg.seed + position["epoch"], 0, needs_gradients)
                continue
            x, gradient = batch[0].to(device), None if batch[1] is None else batch[1].to(device)
            metrics = []
            for state in states:
                for group in state.optimizer.param_groups:
                    group["lr"] = _learning_rate(state.lr, position["step"], cfg)
                step_metrics = train_step(
                    state.sae, state.optimizer, x, gradient, state.tracker, cfg.aux_alpha, k_aux, kernels
                )
                step_metrics.update(
                    dead_fraction=state.tracker.dead_fraction(), lr=state.optimizer.param_groups[0]["lr"]
                )
                state.recent = (state.recent + [step_metrics])[-_SUMMARY_STEPS:]
                metrics.append(step_metrics)
            position.update(step=position["step"] + 1, batch_in_epoch=position["batch_in_epoch"] + 1)
            bar.update(cfg.batch_size)
            bar.set_postfix(
                fvu=f"{metrics[0]['fvu']:.3f}", l0=f"{metrics[0]['l0']:.1f}", dead=f"{metrics[0]['dead_fraction']:.1%}"
            )
            _log_and_checkpoint(out, cfg, states, position, metrics, log, started, start_step)


def _log_and_checkpoint(
    out: Path,
    cfg: TrainConfig,
    states: list[SAEState],
    position: dict[str, int],
    metrics: list[dict[str, float]],
    log: MetricsLog,
    started: float,
    start_step: int,
) -> None:
    step, last = position["step"], position["step"] == cfg.n_steps
    if step % cfg.log_every_steps == 0 or last:
        tokens_per_s = (step - start_step) * cfg.batch_size / max(time.perf_counter() - started, 1e-9)
        log.log(
            [
                {
                    "step": step,
                    "tokens": step * cfg.batch_size,
                    "sae": state.sae.cfg.label,
                    **m,
                    "tokens_per_s": tokens_per_s,
                }
                for state, m in zip(states, metrics, strict=True)
            ]
        )
    every = max(1, cfg.checkpoint_every_tokens // cfg.batch_size)
    if step % every == 0 or last:
        save_checkpoint(out, step, _checkpoint_state(states, position), keep=cfg.keep_checkpoints)


def _checkpoint_state(states: list[SAEState], position: dict[str, int]) -> dict[str, Any]:
    return {
        "position": dict(position),
        "saes": {
            state.sae.cfg.label: {
                "model": state.sae.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "tokens_since_fired": state.tracker.tokens_since_fired,
                "recent": state.recent,
            }
            for state in states
        },
    }


def _finish(out: Path, cfg: TrainConfig, states: list[SAEState]) -> dict[str, SparseAutoencoder]:
    """Save each SAE in the SAELens format and a summary of the last steps' metrics."""
    summary = {}
    for state in states:
        label = state.sae.cfg.label
        save_sae(state.sae, out / SAE_DIR / label)
        recent = state.recent
        summary[label] = {
            "architecture": state.sae.cfg.architecture,
            "d_sae": state.sae.cfg.d_sae,
            "k": state.sae.cfg.k,
            "tokens": cfg.n_steps * cfg.batch_size,
            "fvu": sum(m["fvu"] for m in recent) / len(recent),
            "l0": sum(m["l0"] for m in recent) / len(recent),
            "dead_fraction": state.tracker.dead_fraction(),
            "path": str(out / SAE_DIR / label),
        }
    atomic_write_json(out / SUMMARY_FILE, summary)
    return {state.sae.cfg.label: state.sae for state in states}
