"""SAEs people already share: a SAELens pretrained release and SAE id → a saelab run folder.

    release table (pretrained_releases.yaml, plus a user's `--releases FILE`)
      → the id's folder in a Hugging Face repo   (huggingface_hub's cache; HF_HOME, HF_HUB_OFFLINE honoured)
      → a SAELens 6 folder                       (legacy cfg keys renamed, weights as sae_weights.safetensors)
      → <out>/config.yaml + <out>/saes/<label>/  (what `saelab eval`, `analyze` and the dashboard read)

Legacy SAELens configs (before 6.0, e.g. gpt2-small-res-jb) are converted as SAELens's own
`handle_pre_6_0_config` does: `hook_point` → `hook_name`, architecture "standard" unless the
activation is topk, `normalize_activations` false/null → "none", dtype "torch.float32" → "float32";
the weights may be named `sae_weights.safetensors` or `sparse_autoencoder.safetensors`.

A release with `center_input: true` was trained on TransformerLens's `center_writing_weights` model,
whose residual stream is x·P with P = I − 11ᵀ/d (each token's mean over d_model removed); saelab runs
the raw model. The centring is folded into the encoder, exactly:
    u = (xP − b_dec) W_enc + b_enc = (x − b_dec)(P W_enc) + b_enc − mean(b_dec)·1ᵀW_enc
(b_dec is applied to the input only when `apply_b_dec_to_input`). The decoder is unchanged, so x̂ is the
centred reconstruction: the model downstream sees the same thing (every reader of GPT-2's residual stream
is a LayerNorm, which removes the mean), but FVU against the raw x also counts each token's mean as error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
import yaml

from saelab.atomic import atomic_write_bytes, atomic_write_json
from saelab.errors import SaelabError

if TYPE_CHECKING:  # the store module is imported where it is used: the release table needs none of it
    from saelab.harvest.store import ActivationStore

RELEASES_FILE = Path(__file__).with_name("pretrained_releases.yaml")
SOURCE_CFG = "cfg.json"
# SAELens's name first; `sparse_autoencoder.safetensors` is what its releases before sae_weights used.
SOURCE_WEIGHTS = ("sae_weights.safetensors", "sparse_autoencoder.safetensors")
RENAMED_KEYS = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
# Kept under `metadata`, as SAELens 6 keeps them (sae_lens/loading/pretrained_sae_loaders.py, LLM_METADATA_KEYS).
METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "context_size",
    "dataset_path",
    "neuronpedia_id",
    "sae_lens_version",
    "sae_lens_training_version",
)


@dataclass(frozen=True)
class PretrainedRelease:
    """One release: SAEs in the Hugging Face repo `repo_id`, `saes` mapping each SAE id to its folder there."""

    name: str
    repo_id: str
    model: str
    saes: dict[str, str]
    revision: str | None = None
    center_input: bool = False


@dataclass(frozen=True)
class ImportedSAE:
    """What `import_pretrained_sae` made: the run folder, the SAE's label in it and where it came from."""

    run: Path
    label: str
    sae_folder: Path
    hook: str
    model: str
    d_in: int
    d_sae: int
    architecture: str
    source: dict[str, Any]


# ---- the release table ---------------------------------------------------------------------------


def read_releases(extra: str | Path | None = None) -> dict[str, PretrainedRelease]:
    """The shipped releases, plus (replacing any of the same name) those in the YAML file `extra`."""
    releases = _read_release_file(RELEASES_FILE)
    if extra is not None:
        releases |= _read_release_file(Path(extra))
    return releases


def _read_release_file(path: Path) -> dict[str, PretrainedRelease]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SaelabError(f"{path}: releases file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SaelabError(f"{path}: not a readable YAML releases file ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise SaelabError(f"{path}: must map release names to {{repo_id, model, saes: {{id: folder}}}}")
    return {str(name): _release(str(name), entry, path) for name, entry in data.items()}


def _release(name: str, entry: Any, path: Path) -> PretrainedRelease:
    where = f"{path}: release {name!r}"
    if not isinstance(entry, dict):
        raise SaelabError(f"{where} must be a mapping with repo_id, model and saes")
    unknown = sorted(set(entry) - {"repo_id", "model", "saes", "revision", "center_input"})
    if unknown:
        raise SaelabError(f"{where} has unknown keys {unknown}; allowed: repo_id, model, saes, revision, center_input")
    for key in ("repo_id", "model"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise SaelabError(f"{where} needs {key} (a string)")
    saes = entry.get("saes")
    if not isinstance(saes, dict) or not saes:
        raise SaelabError(f"{where} needs saes: a mapping of SAE id to its folder in the repo")
    if not all(isinstance(folder, str) and folder.strip("/") for folder in saes.values()):
        raise SaelabError(f"{where}: each SAE id must map to a folder path (a string)")
    revision, center = entry.get("revision"), entry.get("center_input", False)
    if revision is not None and not isinstance(revision, str):
        raise SaelabError(f"{where}: revision must be a string (a branch, tag or commit)")
    if not isinstance(center, bool):
        raise SaelabError(f"{where}: center_input must be true or false")
    folders = {str(sae_id): folder.strip("/") for sae_id, folder in saes.items()}
    return PretrainedRelease(name, entry["repo_id"], entry["model"], folders, revision, center)


def resolve_release(release: str, sae_id: str, releases: dict[str, PretrainedRelease]) -> tuple[PretrainedRelease, str]:
    """The release named `release` and the folder of `sae_id` in its repo; unknown names are a SaelabError."""
    if release not in releases:
        raise SaelabError(
            f"unknown release {release!r}; saelab knows {', '.join(sorted(releases))} "
            "(name another in a YAML file given with --releases: {repo_id, model, saes: {id: folder}})"
        )
    entry = releases[release]
    if sae_id not in entry.saes:
        ids = list(entry.saes)
        shown = ", ".join(ids[:20]) + (f", … ({len(ids)} in all)" if len(ids) > 20 else "")
        raise SaelabError(f"release {release!r} has no SAE id {sae_id!r}; its ids: {shown}")
    return entry, entry.saes[sae_id]


# ---- fetching from the hub -----------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, on import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids reaching the hub."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def fetch_sae_files(entry: PretrainedRelease, folder: str, patterns: list[str]) -> Path:
    """The SAE's folder in the local hub cache, after downloading the files in it that match `patterns`
    (relative to the folder) unless they are cached. Offline (HF_HUB_OFFLINE), only the cache is read."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    what = f"{entry.repo_id}/{folder} (release {entry.name!r})"
    try:
        snapshot = snapshot_download(
            entry.repo_id,
            revision=entry.revision,
            allow_patterns=[f"{folder}/{pattern}" for pattern in patterns],
            cache_dir=cache,
            local_files_only=offline,
        )
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise SaelabError(
            f"{what}: the hub has no such repo or revision, or it needs a login ({type(error).__name__}); "
            "check repo_id and revision in the releases table, or `huggingface-cli login` for a gated repo"
        ) from None
    except LocalEntryNotFoundError:
        raise _not_cached(what, cache, offline) from None
    except (HfHubHTTPError, OSError) as error:
        raise SaelabError(f"{what}: could not be fetched from the Hugging Face hub ({_one_line(error)})") from None
    local = Path(snapshot) / folder
    if not (local / SOURCE_CFG).is_file():
        if offline:
            raise _not_cached(what, cache, offline)
        raise SaelabError(f"{what}: the repo has no {folder}/{SOURCE_CFG}; check the folder in the releases table")
    return local


def _not_cached(what: str, cache: Path, offline: bool) -> SaelabError:
    if offline:
        return SaelabError(
            f"{what} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE forbids downloading it: "
            "run once with a network (HF_HUB_OFFLINE unset), or point HF_HOME at a cache that holds it"
        )
    return SaelabError(
        f"{what}: the Hugging Face hub cannot be reached and the cache {cache} does not hold it; "
        "connect to the network, or point HF_HOME at a cache that holds it"
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


# ---- converting to SAELens 6 ---------------------------------------------------------------------


def saelens6_config(raw: dict[str, Any], d_in: int, d_sae: int, where: str) -> dict[str, Any]:
    """A SAELens 6 `cfg.json` for a source cfg, legacy (before SAELens 6) or current; `d_in` and `d_sae` are
    the weights' sizes (legacy cfgs may give only `expansion_factor`)."""
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    legacy = is_legacy_config(raw)
    cfg = {RENAMED_KEYS.get(key, key): value for key, value in raw.items()} if legacy else dict(raw)
    if legacy:
        cfg.setdefault("apply_b_dec_to_input", True)
        cfg.setdefault("architecture", "standard")
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn") == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
            cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
        if isinstance(cfg.get("normalize_activations"), bool):
            cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
        metadata = {key: cfg[key] for key in METADATA_KEYS if cfg.get(key) is not None}
    if cfg.get("hook_head_index", metadata.get("hook_head_index")) is not None:
        raise SaelabError(f"{where}: an SAE of one attention head (hook_head_index) is not one saelab runs")
    for key in ("d_in", "d_sae"):
        given = cfg.get(key)
        if given is not None and given != {"d_in": d_in, "d_sae": d_sae}[key]:
            raise SaelabError(f"{where}: {key} is {given} but the weights have {d_in} × {d_sae} (d_in × d_sae)")
    names = {key: metadata.get(key) or cfg.get(key) for key in ("hook_name", "model_name")}
    if not names["hook_name"]:
        raise SaelabError(f"{where}: names no hook (hook_name, or hook_point in an older SAELens cfg)")
    out: dict[str, Any] = {
        "architecture": cfg.get("architecture"),
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": str(cfg.get("dtype") or "float32").removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": cfg.get("normalize_activations") or "none",
        "reshape_activations": cfg.get("reshape_activations") or "none",
        "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
    }
    if out["architecture"] == "topk":
        out["k"] = cfg.get("k")
    out["metadata"] = {**metadata, **names}
    return out


def is_legacy_config(raw: dict[str, Any]) -> bool:
    """Whether a cfg.json was written before SAELens 6.0 (its version says so; without one, no `metadata`)."""
    metadata = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = str(raw.get("sae_lens_version") or metadata.get("sae_lens_version") or "")
    match = re.match(r"\s*(\d+)", version)
    return int(match.group(1)) < 6 if match else "metadata" not in raw


def read_source_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The SAE's tensors and the name of the file they came from."""
    for name in SOURCE_WEIGHTS:
        if (folder / name).is_file():
            try:
                tensors = safetensors.torch.load_file(folder / name)
            except Exception as error:  # safetensors raises its own types for a truncated or garbled file
                raise SaelabError(f"{folder / name}: not a readable safetensors file ({_one_line(error)})") from None
            break
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise SaelabError(f"{folder}: no weights ({' or '.join(SOURCE_WEIGHTS)}); it holds {found}")
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if key not in tensors:
            raise SaelabError(f"{folder / name}: no tensor {key!r} (found {sorted(tensors)})")
    scaling = tensors.pop("scaling_factor", None)  # SAELens's old fine-tuning scale: all ones means unused
    if scaling is not None and not torch.all(scaling == 1):
        raise SaelabError(f"{folder / name}: a fine-tuning scaling_factor that is not all ones; saelab cannot run it")
    return tensors, name


def center_encoder(tensors: dict[str, torch.Tensor], apply_b_dec_to_input: bool) -> dict[str, torch.Tensor]:
    """Fold the removal of each token's mean (x → xP, P = I − 11ᵀ/d) into the encoder (module docstring)."""
    W_enc, b_dec = tensors["W_enc"].double(), tensors["b_dec"].double()
    b_enc = tensors["b_enc"].double()
    if apply_b_dec_to_input:
        b_enc = b_enc - b_dec.mean() * W_enc.sum(0)
    dtype = tensors["W_enc"].dtype
    return tensors | {"W_enc": (W_enc - W_enc.mean(0)).to(dtype), "b_enc": b_enc.to(tensors["b_enc"].dtype)}


def write_pretrained_sae(
    release: str,
    sae_id: str,
    folder: str | Path,
    releases_file: str | Path | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Fetch SAE `sae_id` of `release` and write it to `folder` (which must not exist) as a SAELens 6 folder
    that `saelab.sae.load_sae` reads; its `metadata.saelab_import` records where it came from.

    `check(cfg)`, when given, sees the converted cfg before the weights are fetched (to refuse a mismatch early).
    """
    from saelab.sae.saelens_format import CFG_FILE, WEIGHTS_FILE, load_sae

    folder = Path(folder)
    if folder.exists():
        raise SaelabError(f"{folder}: already exists; choose a new folder for the SAE")
    entry, path = resolve_release(release, sae_id, read_releases(releases_file))
    source = fetch_sae_files(entry, path, [SOURCE_CFG])
    raw = _read_json(source / SOURCE_CFG)
    sizes = {key: raw.get(key) for key in ("d_in", "d_sae")}
    if isinstance(sizes["d_in"], int) and sizes["d_sae"] is None and isinstance(raw.get("expansion_factor"), int):
        sizes["d_sae"] = sizes["d_in"] * raw["expansion_factor"]
    if all(isinstance(size, int) for size in sizes.values()) and check is not None:
        early = saelens6_config(raw, sizes["d_in"], sizes["d_sae"], str(source / SOURCE_CFG))
        check(_with_model(early, entry))

    source = fetch_sae_files(entry, path, ["*"])
    tensors, weights_name = read_source_weights(source)
    d_in, d_sae = tensors["W_enc"].shape
    cfg = _with_model(saelens6_config(raw, d_in, d_sae, str(source / SOURCE_CFG)), entry)
    if check is not None:
        check(cfg)
    if entry.center_input:
        tensors = center_encoder(tensors, cfg["apply_b_dec_to_input"])
    cfg["dtype"] = str(tensors["W_enc"].dtype).removeprefix("torch.")
    weights = safetensors.torch.save({name: tensor.contiguous() for name, tensor in tensors.items()})
    cfg["metadata"] |= {
        "saelab_import": {
            "release": release,
            "sae_id": sae_id,
            "repo_id": entry.repo_id,
            "revision": entry.revision or "main",
            "commit": source.parents[len(Path(path).parts) - 1].name,  # the snapshot folder's name
            "path": path,
            "source_weights": weights_name,
            "source_format": "SAELens before 6.0 (converted)" if is_legacy_config(raw) else "SAELens 6",
            "center_input": entry.center_input,
        },
        "saelab_sha256": {WEIGHTS_FILE: hashlib.sha256(weights).hexdigest()},
    }
    if entry.center_input:
        cfg["metadata"]["saelab_note"] = (
            "Trained on a residual stream with each token's mean removed (TransformerLens center_writing_weights); "
            "the centring is folded into W_enc and b_enc, the decoder gives the centred reconstruction."
        )

    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        atomic_write_json(tmp / CFG_FILE, cfg)
        atomic_write_bytes(tmp / WEIGHTS_FILE, weights)
        try:  # the folder must read back as an SAE before it is put in place
            load_sae(tmp)
        except SaelabError as error:
            message = str(error).replace(str(tmp / CFG_FILE), "its cfg.json")
            message = message.replace(str(tmp / WEIGHTS_FILE), "its weights")
            raise SaelabError(f"{release} / {sae_id}: {message}") from None
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _with_model(cfg: dict[str, Any], entry: PretrainedRelease) -> dict[str, Any]:
    """The release's model where the cfg names none."""
    cfg["metadata"]["model_name"] = cfg["metadata"].get("model_name") or entry.model
    return cfg


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SaelabError(f"{path}: not readable JSON ({_one_line(error)})") from None
    if not isinstance(data, dict):
        raise SaelabError(f"{path}: must hold a JSON object")
    return data


# ---- the run folder ------------------------------------------------------------------------------


def default_label(release: str, sae_id: str) -> str:
    """`<release>__<id>`, with any character a folder name should not hold replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{release}__{sae_id}")


def import_pretrained_sae(
    release: str,
    sae_id: str,
    store: str | Path,
    out: str | Path,
    releases_file: str | Path | None = None,
    label: str | None = None,
) -> ImportedSAE:
    """Make the run folder `out` for SAE `sae_id` of `release` on the activation store `store`:
    `out/config.yaml` (a TrainConfig naming the store and the SAE's hook) and `out/saes/<label>/`.

    The store must hold the SAE's model at its hook with d_model = its d_in. `out` must be new or empty;
    it is built beside itself and renamed into place, so a failure leaves nothing behind.
    """
    from saelab.config import save_config
    from saelab.harvest.store import ActivationStore
    from saelab.run_layout import CONFIG_FILE, SAE_DIR, SUMMARY_FILE
    from saelab.sae.saelens_format import load_sae
    from saelab.train.config import TrainConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaelabError(f"{out}: already exists and is not an empty folder; choose a new --out (nothing was changed)")
    label = label or default_label(release, sae_id)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", label) or label.startswith("."):
        raise SaelabError(f"label {label!r}: use letters, digits, '.', '_' and '-' (not starting with '.')")
    resolve_release(release, sae_id, read_releases(releases_file))  # an unknown name fails before the store is read
    activations = ActivationStore(store, verify=False)

    def matches_store(cfg: dict[str, Any]) -> None:
        check_store_matches(activations, cfg["metadata"]["model_name"], cfg["metadata"]["hook_name"], cfg["d_in"])

    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        sae_folder = write_pretrained_sae(release, sae_id, tmp / SAE_DIR / label, releases_file, check=matches_store)
        sae = load_sae(sae_folder)
        sae_cfg = dataclasses.replace(sae.cfg, name=label)
        raw = _read_json(sae_folder / SOURCE_CFG)
        train_cfg = TrainConfig(store=str(store), hook=sae_cfg.hook_name, out=str(out), saes=[sae_cfg])
        train_cfg.validate()
        save_config(train_cfg, tmp / CONFIG_FILE)
        # a run whose SAEs are all saved, as training leaves it: the dashboard lists it as finished
        summary = {"architecture": sae_cfg.architecture, "d_sae": sae_cfg.d_sae, "path": str(out / SAE_DIR / label)}
        atomic_write_json(tmp / SUMMARY_FILE, {label: summary | {"imported_from": f"{release} / {sae_id}"}})
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportedSAE(
        run=out,
        label=label,
        sae_folder=out / SAE_DIR / label,
        hook=sae_cfg.hook_name,
        model=sae_cfg.model_name,
        d_in=sae_cfg.d_in,
        d_sae=sae_cfg.d_sae,
        architecture=raw["architecture"],
        source=raw["metadata"]["saelab_import"],
    )


def check_store_matches(store: ActivationStore, model: str, hook: str, d_in: int) -> None:
    """The activation store must hold `model`'s activations at `hook`, d_model = `d_in`; else a SaelabError
    naming the mismatch and the harvest that makes the right store."""
    stored = store.manifest.model
    harvest = f"`saelab harvest model={_model_spec(model)} hooks=[{hook}] out=<folder>`, then pass it as --store"
    if not same_model(stored, model):
        raise SaelabError(
            f"the SAE reads {model} but the activation store {store.path} holds {stored}: "
            f"harvest {model} at {hook} first: {harvest}"
        )
    if hook not in store.hooks:
        raise SaelabError(
            f"the SAE reads {hook} but the activation store {store.path} holds {', '.join(store.hooks)}: "
            f"harvest that hook first: {harvest}"
        )
    if store.d_model != d_in:
        raise SaelabError(f"the SAE has d_in {d_in} but {hook} in {store.path} has d_model {store.d_model}")


def same_model(a: str, b: str) -> bool:
    """Whether two model names (TransformerLens aliases, hub names, saelab's smollm2-135m, local folders
    by their folder name) name the same model."""
    x, y = _official_name(a).lower(), _official_name(b).lower()
    return x == y or x.rsplit("/", 1)[-1] == y.rsplit("/", 1)[-1]


def _official_name(name: str) -> str:
    from saelab.models.smollm2 import SMOLLM2_HF_NAME, SMOLLM2_SPEC

    if name == SMOLLM2_SPEC:
        return SMOLLM2_HF_NAME
    if Path(name).is_dir():
        return Path(name).resolve().name
    try:
        from transformer_lens.supported_models import get_official_model_name

        return get_official_model_name(name)
    except (ValueError, ImportError):  # not a TransformerLens name or alias: a hub name as it is
        return name


def _model_spec(model: str) -> str:
    """The `model=` a harvest names `model` by."""
    from saelab.models.smollm2 import SMOLLM2_SPEC

    return SMOLLM2_SPEC if same_model(model, SMOLLM2_SPEC) else _official_name(model)
