"""A training run folder as the later stages (evaluation, analysis, the dashboard) read it.

The folder `saelab train` writes holds `config.yaml` (the run's TrainConfig, which names its
activation store) and `saes/<label>/` (one SAE each, in the SAELens format). These helpers turn a
missing or half-made folder into one clear error that says which command makes what is missing.
"""

from __future__ import annotations

from pathlib import Path

from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore
from saelab.run_layout import CONFIG_FILE, SAE_DIR
from saelab.sae import SparseAutoencoder
from saelab.sae.saelens_format import CFG_FILE
from saelab.train.config import TrainConfig, load_saved_train_config


def read_run_config(run: Path) -> TrainConfig:
    """The TrainConfig the run at `run` was trained with."""
    if not (run / CONFIG_FILE).is_file():
        raise SaelabError(f"{run} is not a training run (no {CONFIG_FILE}); make one with `saelab train`")
    return load_saved_train_config(run / CONFIG_FILE)


def sae_labels(run: Path, wanted: list[str]) -> list[str]:
    """The labels `wanted` (all the run's SAEs when empty, sorted), each checked to exist under `run/saes/`."""
    folder = run / SAE_DIR
    # A dot-folder is an SAE being written (or left by a kill mid-write): never one to read.
    saved = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    found = sorted(p.name for p in saved if (p / CFG_FILE).is_file())
    if not found:
        raise SaelabError(f"{folder} holds no SAE; has the training run finished? (`saelab train --resume` ends it)")
    missing = [label for label in wanted if label not in found]
    if missing:
        raise SaelabError(f"{folder} has no SAE {', '.join(map(repr, missing))}; it has: {', '.join(found)}")
    return list(wanted) or found


def open_run_store(run: Path, train_cfg: TrainConfig, verify: bool = True) -> ActivationStore:
    """The run's activation store; `verify=False` skips the shard checksums (for manifest and tokens only)."""
    try:
        return ActivationStore(train_cfg.store, verify=verify)
    except SaelabError as error:
        raise SaelabError(f"the activation store of {run} cannot be read: {error}") from error


def sae_hook(sae: SparseAutoencoder, train_cfg: TrainConfig, store: ActivationStore) -> str:
    """The hook `sae` reads: its `hook_name`, else the run's `hook`, else the store's only hook.

    It must be in the store and carry d_model = the SAE's d_in.
    """
    hook = store.hook_name(sae.cfg.hook_name or train_cfg.hook or None)
    if sae.cfg.d_in != store.d_model:
        raise SaelabError(f"{sae.cfg.label} has d_in {sae.cfg.d_in} but {hook} in {store.path} has {store.d_model}")
    return hook
