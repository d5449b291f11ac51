"""Where a circuit's dictionaries come from: a training run's SAEs (with its store and feature stores) or SAE
folders, checked to be of one model, in forward order, and the store their means are taken from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saelab.circuits.dictionaries import Dictionary, load_dictionaries
from saelab.circuits.means import NodeMeans, dictionary_means
from saelab.errors import SaelabError
from saelab.harvest.manifest import read_manifest
from saelab.harvest.store import ActivationStore
from saelab.run_layout import SAE_DIR
from saelab.train.run_folder import read_run_config, sae_labels


@dataclass
class Dictionaries:
    """The dictionaries of a circuit and where they came from: the model they were trained on, the
    activation store their means come from (None: no evaluation), the first position a node may sit at
    (the store's: earlier positions, the BOS and SmolLM2's position-1 sinks, were never trained on)."""

    dictionaries: list[Dictionary]
    model: str
    store: Path | None
    first_position: int
    folders: dict[int, Path] = field(default_factory=dict)


def run_dictionaries(run: str | Path, hooks: list[str] | None = None, labels: list[str] | None = None) -> Dictionaries:
    """The SAEs of a training run in forward order: those named `labels` (all when None), at `hooks` (all when None)."""
    run = Path(run)
    cfg = read_run_config(run)
    labels = sae_labels(run, labels or [])
    dictionaries = load_dictionaries([run / SAE_DIR / label for label in labels], labels)
    store, model, first = Path(cfg.store), "", 1
    try:
        manifest = read_manifest(store)
        model, first = manifest.model, manifest.first_position
    except SaelabError:
        store = None  # moved or deleted: attribution goes on; --evaluate says what is missing
    return _chosen(Dictionaries(dictionaries, model or _model_of(dictionaries), store, first), hooks, str(run))


def folder_dictionaries(
    folders: list[str | Path], store: str | Path | None = None, hooks: list[str] | None = None
) -> Dictionaries:
    """SAE folders (saelab's or SAELens's format); `store`, an activation store of their model, for means."""
    paths = [Path(folder) for folder in folders]
    labels = [path.name for path in paths]
    if len(set(labels)) != len(labels):
        labels = [str(path) for path in paths]
    dictionaries = load_dictionaries(paths, labels)
    first, model = 1, _model_of(dictionaries)
    if store is not None:
        manifest = read_manifest(store)
        first, model = manifest.first_position, manifest.model or model
    return _chosen(Dictionaries(dictionaries, model, Path(store) if store else None, first), hooks, "the SAE folders")


def _model_of(dictionaries: list[Dictionary]) -> str:
    """The one model the dictionaries were trained on (a one-line error when they disagree)."""
    names = {d.sae.cfg.model_name for d in dictionaries if d.sae.cfg.model_name}
    if len(names) > 1:
        listed = ", ".join(f"{d.label}: {d.sae.cfg.model_name}" for d in dictionaries)
        raise SaelabError(
            f"the dictionaries come from different models ({listed}); attribute dictionaries of one model"
        )
    return names.pop() if names else ""


def _chosen(found: Dictionaries, hooks: list[str] | None, where: str) -> Dictionaries:
    """Only the dictionaries writing (or reading) `hooks`; each hook asked for must have one."""
    if not hooks:
        found.folders = _folders_of(found.dictionaries)
        return found
    have = {h for d in found.dictionaries for h in (d.writes, d.reads)}
    unknown = [hook for hook in hooks if hook not in have]
    if unknown:
        raise SaelabError(
            f"no dictionary of {where} reads or writes {', '.join(unknown)}; its hooks are "
            f"{', '.join(sorted({d.writes for d in found.dictionaries}))} (--hooks picks among them)"
        )
    found.dictionaries = [d for d in found.dictionaries if d.writes in hooks or d.reads in hooks]
    found.folders = _folders_of(found.dictionaries)
    return found


def _folders_of(dictionaries: list[Dictionary]) -> dict[int, Path]:
    return {k: d.folder for k, d in enumerate(dictionaries) if d.folder is not None}


def means_store(found: Dictionaries) -> Path:
    """The store the means come from, or a one-line error saying how to name one."""
    if found.store is None:
        raise SaelabError(
            "faithfulness mean-ablates nodes to their means over an activation store, and these dictionaries name "
            "none that can be read; pass --store DIR (a store of their model at their hooks) or leave out --evaluate"
        )
    return found.store


def circuit_means(found: Dictionaries) -> list[NodeMeans]:
    """Every dictionary's node means over its store."""
    store = ActivationStore(means_store(found), verify=False)
    return [dictionary_means(store, d) for d in found.dictionaries]
