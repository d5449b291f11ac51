"""Training runs under a root folder, as the dashboard lists them: what each run and SAE is, how far it
trained and how well it does, read from the files the pipeline wrote (never recomputed).

A run is a folder holding `config.yaml` (the TrainConfig `saelab train` saved) and at least one of
`metrics.jsonl`, `saes/`, `checkpoints/`, `summary.json`. Runs may sit at any depth under the root
(`runs/smollm2-135m/train`). Per SAE, the numbers come from the most reliable file there is:

    eval.json       held-out text (`saelab eval`): FVU, L0, dead fraction, CE loss recovered
    summary.json    the last training batches (`saelab train` at its end)
    metrics.jsonl   the last logged step: all there is while a run is still training

A file that cannot be read is reported in `RunInfo.problems`; it never hides the rest of the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.config import config_from_dict
from saelab.errors import SaelabError
from saelab.harvest.manifest import MANIFEST_FILE
from saelab.run_layout import (
    AUTOINTERP_FILE,
    CHECKPOINT_DIR,
    COMPARE_FILE,
    CONFIG_FILE,
    EVAL_FILE,
    FEATURES_FILE,
    METRICS_FILE,
    PROBING_FILE,
    SAE_DIR,
    SUMMARY_FILE,
)
from saelab.sae.config import SAEConfig
from saelab.sae.registry import registered
from saelab.sae.saelens_format import CFG_FILE, WEIGHTS_FILE, from_saelens
from saelab.train.config import load_saved_train_config

RUNS_ENV = "SAELAB_RUNS"  # the dashboard's runs root, set by `saelab dashboard --runs DIR`
DEFAULT_RUNS_ROOT = "runs"
CURVE_METRICS = ("loss", "fvu", "l0", "dead_fraction")
_RUN_MARKERS = (METRICS_FILE, SAE_DIR, CHECKPOINT_DIR, SUMMARY_FILE)
_NEVER_RUNS = {"wandb", CHECKPOINT_DIR, "shards", SAE_DIR, "__pycache__"}
_MAX_DEPTH = 6


@dataclass
class SAEInfo:
    """One SAE of a run: what it is and its headline numbers (None where no file says)."""

    run: Path
    label: str
    architecture: str | None = None
    d_sae: int | None = None
    sparsity: str = ""  # what sets it, in words (`sparsity_in_words`): "k 32", "L1 coefficient 5"…
    model: str | None = None
    hook: str | None = None
    tokens: int | None = None  # tokens trained on
    fvu: float | None = None
    l0: float | None = None
    dead_fraction: float | None = None
    ce_loss_recovered: float | None = None
    metrics_from: str = "nothing yet"
    evaluation: dict[str, Any] = field(default_factory=dict)  # `saelab eval`'s eval.json, whole ({} when none)
    probing: dict[str, float] = field(default_factory=dict)  # `saelab probe`'s mean accuracies: dense, k1, k5…
    absorption_rate: float | None = None  # `saelab probe`'s mean first-letter absorption rate
    autointerp: dict[str, Any] = field(default_factory=dict)  # `saelab explain`'s autointerp.json

    @property
    def folder(self) -> Path:
        return self.run / SAE_DIR / self.label

    @property
    def features_path(self) -> Path:
        return self.folder / FEATURES_FILE

    @property
    def has_weights(self) -> bool:
        return (self.folder / CFG_FILE).is_file() and (self.folder / WEIGHTS_FILE).is_file()

    @property
    def has_features(self) -> bool:
        return self.features_path.is_file()


@dataclass
class RunInfo:
    path: Path
    name: str  # the path relative to the runs root
    finished: bool  # summary.json written: training ended
    saes: list[SAEInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    comparison: dict[str, Any] = field(default_factory=dict)  # `saelab compare <run>`'s compare.json ({} when none)

    @property
    def status(self) -> str:
        return "finished" if self.finished else "training (or stopped; `saelab train --resume` continues it)"

    def sae(self, label: str) -> SAEInfo | None:
        return next((s for s in self.saes if s.label == label), None)


def runs_root(given: str | Path | None = None) -> Path:
    """The folder to look for runs in: `given`, else `$SAELAB_RUNS`, else `runs`."""
    return Path(given or os.environ.get(RUNS_ENV) or DEFAULT_RUNS_ROOT)


def find_runs(root: str | Path) -> list[RunInfo]:
    """Every training run under `root` (none when it does not exist), sorted by name."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        if CONFIG_FILE in files and any((here / marker).exists() for marker in _RUN_MARKERS):
            found.append(read_run(here, root))
            subfolders.clear()  # a run holds no runs
            continue
        subfolders[:] = sorted(
            s for s in subfolders if not s.startswith(".") and s not in _NEVER_RUNS and depth < _MAX_DEPTH
        )
    return sorted(found, key=lambda run: run.name)


def read_run(path: str | Path, root: str | Path | None = None) -> RunInfo:
    """The run at `path`: its SAEs (from `saes/`, `config.yaml` and `summary.json`) and their numbers."""
    path = Path(path)
    name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)
    run = RunInfo(path, name if name != "." else path.name, finished=(path / SUMMARY_FILE).is_file())
    train_cfg = _attempt(run, lambda: load_saved_train_config(path / CONFIG_FILE), CONFIG_FILE)
    summary = _attempt(run, lambda: _read_json(path / SUMMARY_FILE), SUMMARY_FILE) if run.finished else None
    last = last_training_records(read_metrics(path))

    labels = [sae.label for sae in train_cfg.saes] if train_cfg else []
    folder = path / SAE_DIR
    if folder.is_dir():
        labels += sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels += sorted(summary or {})
    configured = {sae.label: sae for sae in train_cfg.saes} if train_cfg else {}
    store = _store_manifest(path, train_cfg.store) if train_cfg else {}
    if train_cfg and train_cfg.hook:
        store = {**store, "hooks": [train_cfg.hook]}
    summary = summary or {}
    for label in dict.fromkeys(labels):  # in order, once each
        run.saes.append(_read_sae(run, label, configured.get(label), summary.get(label), last.get(label), store))
    run.comparison = _attempt(run, lambda: _read_json(path / COMPARE_FILE), COMPARE_FILE) or {}
    return run


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of `run/metrics.jsonl`, in order; a line that is not JSON (a run being written) is skipped."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "sae" in record:
            records.append(record)
    return records


def last_training_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last training record (one with `tokens`; eval lines have none) of each SAE."""
    return {r["sae"]: r for r in records if "tokens" in r}


def training_curves(records: list[dict[str, Any]], label: str) -> dict[str, list[float]]:
    """`{"tokens": [...], "loss": [...], "fvu": [...], "l0": [...], "dead_fraction": [...]}` of SAE `label`,
    from its training records in step order (a resumed run's log holds each step once)."""
    rows = _training_rows(records, label)
    curves: dict[str, list[float]] = {"tokens": [r["tokens"] for r in rows]}
    for name in CURVE_METRICS:
        curves[name] = [r.get(name) for r in rows]
    return curves


def group_frequency_curves(records: list[dict[str, Any]], label: str) -> dict[int, dict[str, list[float]]]:
    """GBA: per group g, `{"tokens", "freq", "target"}` of SAE `label` over its training records (a group
    appears once it has been measured); empty for any other SAE."""
    rows = _training_rows(records, label)
    curves: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("group") and key.endswith("/freq"):
                group = int(key.removeprefix("group").removesuffix("/freq"))
                curve = curves.setdefault(group, {"tokens": [], "freq": [], "target": []})
                curve["tokens"].append(row["tokens"])
                curve["freq"].append(value)
                curve["target"].append(row[f"group{group}/target"])
    return dict(sorted(curves.items()))


# ---- internals ----------------------------------------------------------------------------------


def _training_rows(records: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """SAE `label`'s training records (eval lines have no `tokens`) in step order."""
    return sorted((r for r in records if r["sae"] == label and "tokens" in r), key=lambda r: r["step"])


def _read_sae(
    run: RunInfo,
    label: str,
    configured: SAEConfig | None,
    summary: dict[str, Any] | None,
    last: dict[str, Any] | None,
    store: dict[str, Any],
) -> SAEInfo:
    info = SAEInfo(run.path, label)
    if configured is not None:
        info.architecture, info.d_sae = configured.architecture, configured.d_sae
        info.sparsity = configured.variant.sparsity_in_words(configured)
    folder = run.path / SAE_DIR / label
    cfg = _attempt(run, lambda: _read_json(folder / CFG_FILE), f"{SAE_DIR}/{label}/{CFG_FILE}")
    if cfg:
        metadata = cfg.get("metadata") or {}
        saelab_cfg = metadata.get("saelab_config") or {}
        info.architecture = metadata.get("saelab_architecture") or from_saelens().get(cfg.get("architecture"))
        info.d_sae = cfg.get("d_sae", info.d_sae)
        info.sparsity = _saved_sparsity(run, label, cfg, saelab_cfg) or info.sparsity
        info.model = metadata.get("model_name") or cfg.get("model_name") or None
        info.hook = metadata.get("hook_name") or cfg.get("hook_name") or None
    hooks = store.get("hooks") or []
    info.model = info.model or store.get("model")
    info.hook = info.hook or (hooks[0] if len(hooks) == 1 else None)

    for source, numbers in (("training (last logged step)", last), ("training (last batches)", summary)):
        if numbers:
            info.tokens = numbers.get("tokens", info.tokens)
            info.fvu, info.l0 = numbers.get("fvu"), numbers.get("l0")
            info.dead_fraction = numbers.get("dead_fraction")
            info.metrics_from = source
    evaluation = _attempt(run, lambda: _read_json(folder / EVAL_FILE), f"{SAE_DIR}/{label}/{EVAL_FILE}")
    if evaluation:
        info.evaluation = evaluation
        info.fvu, info.l0 = evaluation.get("fvu"), evaluation.get("l0")
        info.dead_fraction = evaluation.get("dead_fraction")
        info.ce_loss_recovered = evaluation.get("ce_loss_recovered")
        info.model, info.hook = info.model or evaluation.get("model"), info.hook or evaluation.get("hook")
        info.metrics_from = "eval (held-out text)"
    probed = _attempt(run, lambda: _read_json(folder / PROBING_FILE), f"{SAE_DIR}/{label}/{PROBING_FILE}")
    if probed:
        info.probing = (probed.get("sparse_probing") or {}).get("mean") or {}
        info.absorption_rate = (probed.get("absorption") or {}).get("mean_absorption_rate")
    autointerp = _attempt(run, lambda: _read_json(folder / AUTOINTERP_FILE), f"{SAE_DIR}/{label}/{AUTOINTERP_FILE}")
    info.autointerp = autointerp or {}
    return info


def _store_manifest(run: Path, store: str) -> dict[str, Any]:
    """The run's activation-store manifest (for the model and hook when the SAEs do not name them yet),
    looked for as given and relative to the run's ancestors (configs hold paths relative to where
    the run was started); {} when not found."""
    given = Path(store)
    candidates = [given] if given.is_absolute() else [given, *(ancestor / given for ancestor in run.resolve().parents)]
    for candidate in candidates:
        try:
            manifest = _read_json(candidate / MANIFEST_FILE)
        except (OSError, ValueError):
            continue
        if manifest is not None:
            return manifest
    return {}


def _saved_sparsity(run: RunInfo, label: str, cfg: dict[str, Any], saelab_cfg: dict[str, Any]) -> str:
    """What sets a saved SAE's sparsity, in words: its variant's, from the saelab config it was saved with;
    for a folder SAELens wrote, its k if it has one."""
    if not saelab_cfg:
        return f"k {cfg['k']}" if "k" in cfg else ""
    if registered(saelab_cfg.get("architecture")) is None:
        return ""  # a variant of one's own that this process has not imported
    where = f"{SAE_DIR}/{label}/{CFG_FILE} metadata.saelab_config"
    saved = _attempt(run, lambda: config_from_dict(SAEConfig, SAEConfig.own_fields(saelab_cfg)), where)
    return saved.variant.sparsity_in_words(saved) if saved else ""


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`; None when there is no such file, ValueError when it is not an object."""
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _attempt(run: RunInfo, read: Any, what: str) -> Any:
    """`read()`, or None with a line in `run.problems` when the file cannot be read."""
    try:
        return read()
    except (OSError, ValueError, SaelabError) as error:
        run.problems.append(f"{what}: {error}")
        return None
