"""The training loop: batches from a source, every SAE of the sweep stepped on each, checkpoints, logs.

Resumable bit for bit: a checkpoint holds each SAE's weights and buffers, its Adam state and its
dead-latent counters, and the position in the data (epoch, batch); epoch `e` is the source shuffled
with seed `seed + e`, so the resumed run reads exactly the batches the uninterrupted one would.

Under `torchrun` (several ranks), one of two ways:
- data-parallel (the default): each global batch of `batch_size` rows is cut into one contiguous
  slice per rank, every rank holds every SAE, and `train_step` makes each step the one 1-rank
  training takes on the whole batch (losses normalised by the global batch, gradients summed, dead
  counters and GBA windows all-reduced; BatchTopK: see `BatchTopKSAE.synchronize_`);
- `distribute_saes`: the sweep's SAEs are dealt round-robin to the ranks (SAE i to rank i mod
  world_size) and each rank trains its own on every whole batch, as one process would.
Either way rank 0 alone writes the run folder (config, metrics, checkpoints, SAEs, summary), in the
same format as one process; the other ranks only read. A checkpoint does not depend on the world
size or the way, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from saelab import distributed
from saelab.atomic import atomic_write_json, removed_on_failure
from saelab.config import config_changes, config_identity, save_config
from saelab.distributed import DataParallel
from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore
from saelab.kernels.cpu_bf16 import slow_bf16_notice
from saelab.locking import folder_lock
from saelab.run_layout import CONFIG_FILE, SAE_DIR, SUMMARY_FILE
from saelab.sae import SparseAutoencoder, build_sae, load_sae, save_sae
from saelab.sae.config import default_lr
from saelab.train.checkpoint import complete_checkpoints, load_checkpoint, load_optimizer_state, save_checkpoint
from saelab.train.config import TrainConfig, load_saved_train_config
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.initialization import geometric_median, input_scale
from saelab.train.metrics_log import MetricsLog
from saelab.train.prefetch import Prefetcher
from saelab.train.sources import Batch, BatchSource, StoreSource, map_batch
from saelab.train.step import KernelOptions, StepMetrics, read_metrics, train_step

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
    cfg: TrainConfig,
    source: BatchSource | None = None,
    resume: bool = False,
    progress: bool = True,
    distribute_saes: bool = False,
) -> dict[str, SparseAutoencoder]:
    """Train every SAE of `cfg.saes` into `cfg.out`; returns them by label (also saved under `saes/`).

    Under torchrun every rank calls this. `distribute_saes` (torchrun only; it does not change the
    result, so it is no config key) gives each rank whole SAEs instead of a slice of every batch;
    rank 0 then returns every SAE, the other ranks their own. One process is the one-rank case of
    the same path: rank 0, every SAE, no collective.
    """
    cfg.validate()
    distributed.init_from_environment()
    out, rank, world_size = Path(cfg.out), distributed.rank(), distributed.world_size()
    parallel = _data_parallel(cfg, distribute_saes)
    mine = [i for i in range(len(cfg.saes)) if parallel is not None or i % world_size == rank]
    source, provenance = _open_source(cfg, source)  # bad input fails before the run folder exists
    created = not out.exists()  # …and what fails later (the batch size for this store…) removes it again
    with ExitStack() as held:

        def prepare() -> Path | None:
            held.enter_context(folder_lock(out, what="training run"))
            held.enter_context(removed_on_failure(out, created, _has_results))
            _prepare_run_folder(out, cfg, resume)
            checkpoints = complete_checkpoints(out) if resume else []
            return checkpoints[-1] if checkpoints else None

        latest = distributed.run_on_main(prepare, "preparing the run folder")
        device = torch.device(distributed.device_for(cfg.device))
        states = _build_states(cfg, source.d_in, provenance, device, parallel, mine, source)
        position = _restore_or_initialize(cfg, source, states, latest)
        finished_before = position["step"] >= cfg.n_steps
        if parallel is not None:
            _broadcast_from_main(states)  # ranks start from rank 0's bits, whatever their devices computed
        log = None
        if rank == 0:
            log = MetricsLog(out, cfg.wandb, _identity(cfg), resume_step=position["step"] if resume else None)
        try:
            _run_steps(out, cfg, source, states, position, log, device, progress and rank == 0, parallel)
        finally:
            if log is not None:
                log.close()
        if distribute_saes and distributed.is_distributed():  # rank 0 saves every SAE: gather them, in sweep order
            gathered = distributed.gather_to_main([_portable(state) for state in states], "gathering the SAEs")
            states = _in_sweep_order(cfg, gathered) if gathered is not None else states

        def finish() -> None:
            _finish(out, cfg, states, finished_before)

        distributed.run_on_main(finish, "saving the SAEs")
        return {state.sae.cfg.label: state.sae for state in states}


def _data_parallel(cfg: TrainConfig, distribute_saes: bool) -> DataParallel | None:
    """The all-reduces when several ranks share every batch; None on one process or with the SAEs dealt out."""
    world_size = distributed.world_size()
    if not distributed.is_distributed():
        return None
    if distribute_saes:
        if len(cfg.saes) < world_size:
            raise SaelabError(
                f"distribute_saes: {len(cfg.saes)} SAE(s) for {world_size} ranks would leave ranks idle; "
                "start at most as many ranks as SAEs, or train data-parallel"
            )
        return None
    if cfg.batch_size % world_size:
        raise SaelabError(
            f"batch_size {cfg.batch_size} is not divisible by the {world_size} ranks; "
            "each rank trains on an equal slice of every batch"
        )
    return DataParallel()


def _portable(state: SAEState) -> SAEState:
    """What rank 0 needs of another rank's SAE to save it: a CPU copy, its counters, its recent metrics."""
    return SAEState(copy.deepcopy(state.sae).cpu(), None, state.tracker.cpu(), state.lr, state.recent)  # type: ignore[arg-type]


def _in_sweep_order(cfg: TrainConfig, gathered: list[list[Any]]) -> list[Any]:
    """Items gathered from every rank (each a list, labelled by `.sae.cfg.label` or `[0]`) in `cfg.saes` order."""
    by_label = {}
    for items in gathered:
        for item in items:
            by_label[item[0] if isinstance(item, tuple) else item.sae.cfg.label] = item
    return [by_label[sae_cfg.label] for sae_cfg in cfg.saes]


def _broadcast_from_main(states: list[SAEState]) -> None:
    """Every rank's weights and buffers := rank 0's (through a contiguous copy where a tensor is laid out
    otherwise, as W_enc is on CUDA: collectives take contiguous tensors only)."""
    for state in states:
        for tensor in state.sae.state_dict().values():
            sent = tensor.contiguous()
            with distributed.collective("broadcasting the initial weights"):
                dist.broadcast(sent, src=0)
            if sent is not tensor:
                tensor.copy_(sent)


def _open_source(cfg: TrainConfig, source: BatchSource | None) -> tuple[BatchSource, dict[str, str]]:
    if source is not None:
        return source, {"hook_name": cfg.hook or "", "model_name": ""}
    store = ActivationStore(cfg.store, read_threads=_read_threads(cfg))
    if not store.complete:  # its shuffle would change as shards arrive: no run could resume or be repeated
        raise SaelabError(
            f"the activation store {cfg.store} is incomplete ({store.n_contexts:,} of "
            f"{store.manifest.n_contexts_planned:,} contexts): its harvest is running or was stopped; "
            "finish it (rerun the same saelab harvest), then train"
        )
    store_source = StoreSource(store, cfg.hook, _other_hooks(cfg))
    return store_source, {"hook_name": store_source.hook, "model_name": store.manifest.model}


def _read_threads(cfg: TrainConfig) -> int:
    """Threads that read the store: the host's share of cores (up to 8) when a GPU runs the step, else one."""
    if not distributed.device_for(cfg.device).startswith("cuda"):
        return 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // ranks_here))


def _other_hooks(cfg: TrainConfig) -> list[str]:
    """Hooks beyond the run's that the sweep reads: SAEs on another hook, transcoders' inputs and targets."""
    hooks = [hook for sae in cfg.saes for hook in (sae.hook_name, sae.hook_name_out) if hook and hook != cfg.hook]
    return list(dict.fromkeys(hooks))


def _has_results(out: Path) -> bool:
    """A checkpoint or a saved SAE: something a rerun continues from or a later stage reads."""
    return bool(complete_checkpoints(out)) or (out / SAE_DIR).exists()


def _identity(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with its start; `dtype: auto` counts as what it means on this device,
    so a float32 run on the CPU resumes under `auto`, and an `auto` run started on the CPU not on a GPU."""
    dtype = cfg.resolved_dtype(distributed.device_for(cfg.device))
    return config_identity(cfg, ignore=_NOT_IDENTITY) | {"dtype": dtype}


def _prepare_run_folder(out: Path, cfg: TrainConfig, resume: bool) -> None:
    saved = out / CONFIG_FILE
    if saved.exists() and not resume:
        raise SaelabError(f"{out} already holds a training run; pass --resume to continue it, or choose a new `out`")
    if saved.exists():
        before = load_saved_train_config(saved)
        _pin_unset_input_norms(before, saved)
        _keep_saved_forms(before, cfg)
        if changed := config_changes(_identity(before), _identity(cfg)):
            raise SaelabError(f"{out} was trained with a different config ({'; '.join(changed)}); resume it unchanged")
        return
    save_config(cfg, saved)


def _pin_unset_input_norms(cfg: TrainConfig, path: Path) -> None:
    """A run saved before `input_norm` existed trained every SAE with "none", which an unset key no longer
    means for batchtopk and gba: pin it, so that resuming such a run under today's default is a named change."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for sae_cfg, entry in zip(cfg.saes, raw.get("saes") or [], strict=False):
        if isinstance(entry, dict) and "input_norm" not in entry:
            sae_cfg.input_norm = "none"


def _keep_saved_forms(saved: TrainConfig, cfg: TrainConfig) -> None:
    """What each SAE's saved config meant that the resumed config, leaving it unset, now means otherwise
    (`keep_saved_form`: GBA's form from when it was always tied)."""
    for before, now in zip(saved.saes, cfg.saes, strict=False):
        if before.variant is now.variant:
            now.variant.keep_saved_form(before, now)


def _build_states(
    cfg: TrainConfig,
    d_in: int,
    provenance: dict[str, str],
    device: torch.device,
    parallel: DataParallel | None = None,
    indices: list[int] | None = None,
    source: BatchSource | None = None,
) -> list[SAEState]:
    """The states of the SAEs `indices` of the sweep (all by default); SAE i's weights are seeded by i.
    Widths come from `source` (each SAE's hook), else every SAE is `d_in` wide."""
    states = []
    for index, sae_cfg in enumerate(cfg.saes):
        if indices is not None and index not in indices:
            continue
        sae_cfg.hook_name = sae_cfg.hook_name or provenance["hook_name"]
        width = getattr(source, "width", lambda hook: d_in)  # a source of one hook's rows: d_in
        sae_cfg.d_in = width(sae_cfg.hook_name)
        if sae_cfg.variant.transcoder:
            sae_cfg.d_out = width(sae_cfg.hook_name_out)
        sae_cfg.model_name = sae_cfg.model_name or provenance["model_name"]
        generator = torch.Generator().manual_seed(_init_seed(cfg.seed, index))
        sae = build_sae(sae_cfg, generator=generator).to(device)
        lr = cfg.lr if cfg.lr is not None else default_lr(sae_cfg.d_sae)
        groups = [{**group, "lr": lr * group["lr_scale"]} for group in sae.parameter_groups()]
        # fused: one kernel over all parameters (on the CPU ~6× faster than the per-tensor loop)
        optimizer = torch.optim.Adam(groups, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True)
        tracker = DeadLatentTracker(sae_cfg.d_sae, cfg.resolved_dead_tokens(), parallel, device)
        if parallel is not None:
            sae.use_data_parallel(parallel)  # GBA sums its window statistics over ranks
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
    cfg: TrainConfig, source: BatchSource, states: list[SAEState], latest: Path | None
) -> dict[str, int]:
    """From the latest checkpoint (rank 0 found it for every rank; None: there is none), else a fresh start."""
    if latest is None:
        _initialize(cfg, source, states)
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    checkpoint = load_checkpoint(latest)
    for state in states:
        saved = checkpoint["saes"][state.sae.cfg.label]
        _load_sae_state(state.sae, saved["model"], latest)
        load_optimizer_state(state.optimizer, saved["optimizer"])
        state.tracker.load_(saved["tokens_since_fired"])
        state.recent = saved["recent"]
    return checkpoint["position"]


def _load_sae_state(sae: SparseAutoencoder, saved: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """The SAE's weights and buffers from a checkpoint; one written by a saelab whose SAE had other tensors
    (e.g. GBA before its tied, JumpReLU form) is a one-line error, not a traceback."""
    try:
        sae.load_state_dict(saved)
    except RuntimeError as error:
        missing = sorted(set(sae.state_dict()) - set(saved))
        extra = sorted(set(saved) - set(sae.state_dict()))
        raise SaelabError(
            f"{checkpoint}: the {sae.cfg.label} SAE saved there has other tensors than this saelab's "
            f"{sae.cfg.architecture} (missing {missing or 'none'}, unexpected {extra or 'none'}): it was written "
            "by an older saelab; train it anew into another `out`"
        ) from error


@torch.no_grad()
def _initialize(cfg: TrainConfig, source: BatchSource, states: list[SAEState]) -> None:
    """Set every SAE's input scale, start b_dec at the geometric median of a sample (in the SAE's space),
    and let each SAE calibrate its selection on the sample (GBA's biases, JumpReLU's thresholds)."""
    if source.n_batches(cfg.batch_size) == 0:
        raise SaelabError(f"the data has fewer rows than one batch of {cfg.batch_size}; lower batch_size")
    samples = _initialization_sample(cfg, source)
    medians: dict[tuple[str, str], torch.Tensor] = {}  # b_dec's start per (hook, input_norm): the geometric median
    for state in states:
        sae = state.sae
        sample = samples[sae.cfg.hook_name] if sae.cfg.hook_name in samples else samples[""]
        if sae.cfg.input_norm == "layer_norm":  # per-token scales; `input_scale` is their typical one
            typical_std = (1 / sae.token_norm(sample).scale).mean()
            sae.input_scale.fill_(float(1 / typical_std))
        else:
            sae.input_scale.fill_(input_scale(sample) if cfg.normalize_activations else 1.0)
        if sae.transcoder:  # b_dec lives in the target's space, scaled by its own factor
            sample = samples[sae.cfg.hook_name_out]
            sae.target_scale.fill_(input_scale(sample) if cfg.normalize_activations else 1.0)
        key = (sae.cfg.hook_name_out or sae.cfg.hook_name, sae.cfg.input_norm)
        if key not in medians:
            medians[key] = geometric_median(sae.output_norm(sae.token_norm(sample)).into(sample))
        sae.b_dec.copy_(medians[key])
        sae.calibrate(sample)


def _initialization_sample(cfg: TrainConfig, source: BatchSource) -> dict[str, torch.Tensor]:
    """`init_sample_rows` rows drawn apart from the training epochs, by hook ("" and the run's hook: its own)."""
    rows, parts = 0, []
    for batch in source.batches(cfg.batch_size, seed=cfg.seed + _INIT_SEED_OFFSET):
        x, _, *others = batch
        parts.append({"": x, **(others[0] if others else {})})
        rows += len(x)
        if rows >= cfg.init_sample_rows:
            break
    samples = {hook: torch.cat([part[hook] for part in parts])[: cfg.init_sample_rows].float() for hook in parts[0]}
    samples[cfg.hook or getattr(source, "hook", "")] = samples[""]
    return samples


def _penalty_scale(warmup: float, step: int, cfg: TrainConfig) -> float:
    """The sparsity penalty's share at `step`: linear from 1/(warm-up steps) to 1 over the first `warmup` of the run."""
    warmup_steps = warmup * cfg.n_steps
    return 1.0 if warmup_steps < 1 else min(1.0, (step + 1) / warmup_steps)


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
    log: MetricsLog | None,
    device: torch.device,
    progress: bool,
    parallel: DataParallel | None = None,
) -> None:
    """Step every SAE on each batch until `cfg.n_steps`. The host never waits for the device but to read
    the metrics, and only at the steps that log or checkpoint; batches arrive read ahead (`Prefetcher`)."""
    if position["step"] >= cfg.n_steps:  # resumed after it had finished
        return
    needs_gradients = any(state.sae.trains_on_gradients for state in states)
    if cfg.bf16_falls_back(str(device)) and distributed.is_main():
        print(f"saelab train: {slow_bf16_notice()}", file=sys.stderr)
    bf16 = cfg.resolved_dtype(str(device)) == "bfloat16"
    kernels = KernelOptions(cfg.encoder_tile, torch.bfloat16 if bf16 else None)
    k_aux = cfg.k_aux if cfg.k_aux is not None else source.d_in // 2
    unread: list[list[StepMetrics]] = [[] for _ in states]  # each SAE's metrics since they were last read
    epochs = _epochs(source, cfg, position["epoch"], position["batch_in_epoch"], needs_gradients, parallel)
    bar = tqdm(
        total=cfg.n_steps * cfg.batch_size,
        initial=position["step"] * cfg.batch_size,
        unit="tok",
        unit_scale=True,
        desc="train",
        disable=not progress,
    )
    started, start_step = time.perf_counter(), position["step"]
    with bar, Prefetcher(epochs, _host_side(device)) as batches:
        for epoch, batch_in_epoch, batch in batches:
            x, gradient, *others = map_batch(batch, lambda rows: rows.to(device, non_blocking=True).float())
            rows = {"": x} | (others[0] if others else {})
            for state, waiting in zip(states, unread, strict=True):
                waiting.append(_step(cfg, state, rows, gradient, k_aux, kernels, position["step"], parallel, device))
            position.update(step=position["step"] + 1, epoch=epoch, batch_in_epoch=batch_in_epoch + 1)
            bar.update(cfg.batch_size)
            if not any(_due(cfg, position["step"])):  # only then are the metrics read from the device
                continue
            metrics = _read_metrics(states, unread)
            bar.set_postfix(
                fvu=f"{metrics[0]['fvu']:.3f}", l0=f"{metrics[0]['l0']:.1f}", dead=f"{metrics[0]['dead_fraction']:.1%}"
            )
            _log_and_checkpoint(out, cfg, states, position, metrics, log, started, start_step, parallel)
            if position["step"] >= cfg.n_steps:
                return


def _step(
    cfg: TrainConfig,
    state: SAEState,
    rows: dict[str, torch.Tensor],
    gradient: torch.Tensor | None,
    k_aux: int,
    kernels: KernelOptions,
    step: int,
    parallel: DataParallel | None,
    device: torch.device,
) -> StepMetrics:
    """One SAE's step on the batch `rows` (by hook; "": the run's), at this step's learning rate."""
    for group in state.optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)  # absent from optimisers saved before groups had scales
        group["lr"] = _learning_rate(state.lr, step, cfg) * scale
    sae_cfg = state.sae.cfg
    metrics = train_step(
        state.sae,
        state.optimizer,
        rows.get(sae_cfg.hook_name, rows[""]),
        gradient,
        state.tracker,
        cfg.aux_alpha,
        k_aux,
        kernels,
        parallel,
        target=rows[sae_cfg.hook_name_out] if state.sae.transcoder else None,
        penalty_scale=_penalty_scale(sae_cfg.penalty_warmup, step, cfg),
    )
    if parallel is not None:
        metrics = _global_metrics(metrics, parallel, device)
        state.sae.synchronize_(parallel)  # BatchTopK's threshold
    return metrics


def _due(cfg: TrainConfig, step: int) -> tuple[bool, bool]:
    """(log, checkpoint): whether step `step` (counted from 1) logs and whether it checkpoints; the last does both."""
    last = step >= cfg.n_steps
    checkpoint_every = max(1, cfg.checkpoint_every_tokens // cfg.batch_size)
    return step % cfg.log_every_steps == 0 or last, step % checkpoint_every == 0 or last


def _read_metrics(states: list[SAEState], unread: list[list[StepMetrics]]) -> list[dict[str, float]]:
    """Read every SAE's unread metrics (one wait for the device), keep the last ones in `recent`, and
    return the latest step's per SAE with what is only read at log time: dead fraction, lr, a variant's own."""
    latest = []
    for state, waiting in zip(states, unread, strict=True):
        read = read_metrics(waiting)
        waiting.clear()
        state.recent = (state.recent + read)[-_SUMMARY_STEPS:]
        extras = {"dead_fraction": state.tracker.dead_fraction(), "lr": state.optimizer.param_groups[0]["lr"]}
        latest.append({**read[-1], **state.sae.logged_metrics(), **extras})
    return latest


def _host_side(device: torch.device) -> Callable[[tuple[int, int, Batch]], tuple[int, int, Batch]]:
    """What the prefetch thread does to each (epoch, index, batch): pin the batch for an asynchronous copy
    to a GPU; on the CPU make it the float32 the step takes (there the thread's conversion overlaps the step)."""
    prepare = torch.Tensor.pin_memory if device.type == "cuda" else torch.Tensor.float
    return lambda item: (item[0], item[1], map_batch(item[2], prepare))


def _epochs(
    source: BatchSource,
    cfg: TrainConfig,
    epoch: int,
    start_batch: int,
    with_gradients: bool,
    parallel: DataParallel | None,
) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index in the epoch, batch) from batch `start_batch` of epoch `epoch` on, epoch after epoch:
    epoch e is the source shuffled with seed `cfg.seed + e`."""
    while True:
        yielded = False
        for index, batch in enumerate(_batches(source, cfg, epoch, start_batch, with_gradients, parallel), start_batch):
            yielded = True
            yield epoch, index, batch
        if not yielded and start_batch == 0:
            raise SaelabError(f"the data has fewer rows than one batch of {cfg.batch_size}; lower batch_size")
        epoch, start_batch = epoch + 1, 0


def _batches(
    source: BatchSource,
    cfg: TrainConfig,
    epoch: int,
    start_batch: int,
    with_gradients: bool,
    parallel: DataParallel | None,
) -> Iterator[Batch]:
    """Epoch `epoch`'s batches from `start_batch`; data-parallel: this rank's slice of each."""
    seed = cfg.seed + epoch
    if parallel is None:
        return source.batches(cfg.batch_size, seed, start_batch, with_gradients)
    rows = parallel.slice_of(cfg.batch_size)
    if isinstance(source, StoreSource):  # reads only this rank's rows
        return source.batch_slices(cfg.batch_size, seed, rows, start_batch, with_gradients)
    return (_slice(batch, rows) for batch in source.batches(cfg.batch_size, seed, start_batch, with_gradients))


def _slice(batch: Batch, rows: slice) -> Batch:
    """The rows `rows` of every tensor of a batch."""
    return map_batch(batch, lambda tensor: tensor[rows])


def _global_metrics(metrics: StepMetrics, parallel: DataParallel, device: torch.device) -> StepMetrics:
    """A step's metrics for the global batch: the loss terms are per-rank shares (summed), L0 a per-rank mean.
    Reduced on the device: nothing is read back."""
    keys = ("loss", "fvu", "aux_loss", "l0")
    values = parallel.sum_(torch.stack([metrics[key].to(device, torch.float64) for key in keys]))
    values[3] /= parallel.world_size  # equal slices: the mean of the ranks' means
    return {**metrics, **dict(zip(keys, values.unbind(), strict=True))}


def _log_and_checkpoint(
    out: Path,
    cfg: TrainConfig,
    states: list[SAEState],
    position: dict[str, int],
    metrics: list[dict[str, float]],
    log: MetricsLog | None,
    started: float,
    start_step: int,
    parallel: DataParallel | None = None,
) -> None:
    """Log every `log_every_steps`, checkpoint every `checkpoint_every_tokens`; only where `log` is (rank 0).

    With the SAEs distributed over ranks (`log` on rank 0, `parallel` None), rank 0 first gathers
    every rank's metrics and checkpoint entries, so it writes what one process would.
    """
    step = position["step"]
    log_due, checkpoint_due = _due(cfg, step)
    if not (log_due or checkpoint_due) or (parallel is not None and log is None):
        return
    labelled = [(state.sae.cfg.label, m) for state, m in zip(states, metrics, strict=True)]
    entries = {state.sae.cfg.label: _sae_checkpoint(state) for state in states} if checkpoint_due else {}
    if distributed.is_distributed() and parallel is None:
        payload = [(label, m, _to_bytes(entries[label]) if checkpoint_due else None) for label, m in labelled]
        gathered = distributed.gather_to_main(payload, f"gathering step {step}'s metrics and checkpoint")
        if gathered is None:
            return
        ordered = _in_sweep_order(cfg, gathered)
        labelled = [(label, m) for label, m, _ in ordered]
        entries = {label: _from_bytes(data) for label, _, data in ordered} if checkpoint_due else {}
    assert log is not None
    if log_due:
        tokens_per_s = (step - start_step) * cfg.batch_size / max(time.perf_counter() - started, 1e-9)
        log.log(
            [
                {"step": step, "tokens": step * cfg.batch_size, "sae": label, **m, "tokens_per_s": tokens_per_s}
                for label, m in labelled
            ]
        )
    if checkpoint_due:
        save_checkpoint(out, step, {"position": dict(position), "saes": entries}, keep=cfg.keep_checkpoints)


def _sae_checkpoint(state: SAEState) -> dict[str, Any]:
    return {
        "model": state.sae.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "tokens_since_fired": state.tracker.tokens_since_fired.cpu(),
        "recent": state.recent,
    }


def _to_bytes(entry: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _finish(out: Path, cfg: TrainConfig, states: list[SAEState], finished_before: bool = False) -> None:
    """Save each SAE in the SAELens format and a summary of the last steps' metrics.

    A run resumed after it had finished (`make demo` run again) keeps the SAE folders it already
    saved: they hold these very weights, and later stages' files (eval.json, features.sqlite) beside
    them, which a new save would refuse to replace. A folder a kill left half-saved is saved again.
    """
    summary = {}
    for state in states:
        label = state.sae.cfg.label
        if not (finished_before and _holds_saved_sae(out / SAE_DIR / label)):
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


def _holds_saved_sae(folder: Path) -> bool:
    """Whether `folder` holds a complete SAE that passes its checksums."""
    try:
        load_sae(folder)
    except (SaelabError, OSError):
        return False
    return True
