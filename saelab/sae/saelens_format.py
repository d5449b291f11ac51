"""Saving and loading SAEs in SAELens's on-disk format, the format people share SAEs in.

A folder holds
    cfg.json                      SAELens's config; saelab's own fields under `metadata.saelab_*`
    sae_weights.safetensors       W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
                                  (+ threshold [d_sae] for "jumprelu")
    saelab_buffers.safetensors    saelab-only state that SAELens never reads (GBA's groups and counters…)

An SAE with input_norm "none" is saved with normalize_activations "none", its input scale s folded into
the weights:
    u = (x·s − b_dec) W_enc + b_enc = (x − b_dec/s)(s·W_enc) + b_enc
    x̂ = (z W_dec + b_dec) / s      = z (W_dec/s) + b_dec/s
i.e. W_enc' = s·W_enc, W_dec' = W_dec/s, b_dec' = b_dec/s, b_enc' = b_enc; `load_sae` unfolds them.
One with input_norm "layer_norm" is saved unfolded with normalize_activations "layer_norm", which SAELens
applies the same way per token (x − μ)/(σ + 1e-5), and back x̂·σ + μ (saelab: x̂·(σ + 1e-5) + μ); s, its
typical scale for token-free uses, is kept in the metadata only.

A transcoder has two scales, its input's s and its target's t: W_enc' = s·W_enc, W_dec' = W_dec/t,
b_dec' = b_dec/t, W_skip' = W_skip·s/t; it is saved with apply_b_dec_to_input false, as SAELens's are,
d_out, and `hook_name_out` in the metadata.

What SAELens sees (the closest architecture it runs at inference):
    topk      → "topk"
    standard, jumprelu, gated, transcoder, skip_transcoder → the same name, the same forward
    matryoshka_batchtopk → "jumprelu" with threshold θ, as BatchTopK (SAELens saves it so too)
    gsae      → "topk"      its gradient-aware selection exists only in training; inference is TopK
    gba       → "jumprelu"  (activation jumprelu, the default) exactly: b_enc 0, threshold −a·b and a folded
                into W_enc, since a·(u − b)·1[u > 0] = h·1[h > −a·b] with h = a·(u − b), the scaled
                bias-free projection (`GBASAE.to_saelens_`)
    gba       → "standard"  (activation relu) a ReLU SAE; b_enc a·b, a folded into W_enc
    batchtopk → "jumprelu"  with threshold θ for every latent. SAELens does the same: its
                BatchTopKTrainingSAE names JumpReLUSAEConfig as its inference config and turns
                `topk_threshold` into `threshold = θ·ones(d_sae)` when saving; "batchtopk" is registered
                only as a training class (sae_lens/saes/batchtopk_sae.py, sae_lens/__init__.py).
Folders SAELens wrote load too (input scale 1; normalize_activations "none" or "layer_norm") as the saelab
class whose `loads_saelens` lists the SAELens architecture they name (the same name).

Each variant says all of this about itself (`SparseAutoencoder`: `saved_as`, `note`, `to_saelens_`,
`from_saelens_`, `saelens_renames`, `transcoder`); this module knows only SAELens's side of the format.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import saelab
from saelab.atomic import atomic_write_bytes, atomic_write_json
from saelab.config import config_from_dict, config_to_dict
from saelab.errors import SaelabError
from saelab.sae.base import SparseAutoencoder
from saelab.sae.config import SAEConfig
from saelab.sae.registry import SAE_CLASSES, architectures, build_sae, variant_class

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
BUFFERS_FILE = "saelab_buffers.safetensors"
FOLDED_BUFFERS = ("input_scale", "target_scale")  # kept in the metadata and folded into the weights

# The tensors of each SAELens architecture beyond W_enc, W_dec and b_dec.
SAELENS_TENSORS = {
    "topk": ("b_enc",),
    "standard": ("b_enc",),
    "jumprelu": ("b_enc", "threshold"),
    "gated": ("b_gate", "r_mag", "b_mag"),
    "transcoder": ("b_enc",),
    "skip_transcoder": ("b_enc", "W_skip"),
}
NORM_NOTES = {
    "none": "The input scale is folded into the weights.",
    "layer_norm": "Each token is layer-normalised on the way in (normalize_activations layer_norm).",
}
# SAELens architectures whose cfg.json holds k
SAELENS_WITH_K = ("topk",)


def saelens_architecture(cfg: SAEConfig) -> str:
    """The SAELens architecture a saelab SAE is saved as (see the module docstring)."""
    return cfg.variant.saved_as(cfg)


def from_saelens() -> dict[str, str]:
    """SAELens architecture → the saelab architecture its folders load as (the variants' `loads_saelens`)."""
    architectures()  # the variants registered
    return {saelens: name for name, cls in SAE_CLASSES.items() for saelens in vars(cls).get("loads_saelens", ())}


def _folded_scale(cfg: SAEConfig, input_scale: float) -> float:
    """The factor folded into the saved weights: the input scale, or 1 where SAELens normalises each token."""
    return input_scale if cfg.input_norm == "none" else 1.0


def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the SAELens architecture `cfg` is saved as, by name, with its shape."""
    d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.output_width
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    extra = SAELENS_TENSORS[saelens_architecture(cfg)]
    return {name: shapes.get(name, (d_sae,)) for name in ("W_enc", "W_dec", "b_dec", *extra)}


def _scales(sae: SparseAutoencoder) -> tuple[float, float]:
    """(input side, output side) factors folded into the saved weights (module docstring)."""
    fold_in = _folded_scale(sae.cfg, float(sae.input_scale))
    return fold_in, float(sae.target_scale) if sae.transcoder else fold_in


def _saved_weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The tensors SAELens reads, in float64, the scales folded in, under SAELens's names."""
    fold_in, fold_out = _scales(sae)
    weights = {
        "W_enc": sae.W_enc.double() * fold_in,
        "W_dec": sae.W_dec.double() / fold_out,
        "b_enc": sae.b_enc.double(),
        "b_dec": sae.b_dec.double() / fold_out,
    }
    sae.to_saelens_(weights, fold_in, fold_out)
    return {sae.saelens_renames.get(name, name): tensor for name, tensor in weights.items()}


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `sae` to `folder` in SAELens's format, all at once: the folder is built under a temporary
    name beside it and renamed into place. An existing SAE folder there is replaced."""
    folder = Path(folder)
    _check_replaceable(folder)
    cfg = sae.cfg
    scale = float(sae.input_scale)
    saved_as = saelens_architecture(cfg)
    dtype = sae.W_enc.dtype
    with torch.no_grad():
        weights = {name: tensor.to("cpu", dtype).contiguous() for name, tensor in _saved_weights(sae).items()}
        buffers = {name: b.detach().cpu().contiguous() for name, b in sae.named_buffers() if name not in FOLDED_BUFFERS}

    metadata = {
        "hook_name": cfg.hook_name,
        "model_name": cfg.model_name,
        "saelab_version": saelab.__version__,
        "saelab_architecture": cfg.architecture,
        "saelab_input_scale": scale,
        "saelab_config": config_to_dict(cfg),
        "saelab_note": " ".join([cfg.variant.note(cfg), NORM_NOTES[cfg.input_norm]]).strip(),
    }
    sae_lens_cfg: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": cfg.input_norm,
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if sae.transcoder:
        sae_lens_cfg["d_out"] = cfg.output_width
        metadata["hook_name_out"] = cfg.hook_name_out
        metadata["saelab_target_scale"] = float(sae.target_scale)
    if saved_as in SAELENS_WITH_K:
        sae_lens_cfg["k"] = cfg.k
    sae_lens_cfg["rescale_acts_by_decoder_norm"] = False
    sae_lens_cfg["architecture"] = saved_as

    files = {WEIGHTS_FILE: safetensors.torch.save(weights)}
    if buffers:
        files[BUFFERS_FILE] = safetensors.torch.save(buffers)
    metadata["saelab_sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        atomic_write_json(tmp / CFG_FILE, sae_lens_cfg)
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        _move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE folder written by `save_sae` (the exact saelab variant) or by SAELens itself.

    Returned in eval mode (BatchTopK then uses its threshold); call `.train()` to continue training.
    """
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    raw = _read_json(cfg_path)
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SaelabError(f"{cfg_path}: metadata must be a JSON object")
    if "saelab_config" in metadata:
        cfg, scale = _saelab_config(raw, metadata, cfg_path)
    else:
        cfg, scale = _saelens_config(raw, metadata, cfg_path), 1.0

    _verify_checksums(folder, metadata.get("saelab_sha256"), cfg_path)
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0))  # weights are overwritten below
    tensors = _read_tensors(weights_path)
    for name, shape in _expected_shapes(cfg).items():
        if name not in tensors:
            raise SaelabError(f"{weights_path}: no tensor {name!r} (found {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise SaelabError(
                f"{weights_path}: {name} has shape {list(tensors[name].shape)}, "
                f"but {CFG_FILE} (d_in {cfg.d_in}, d_sae {cfg.d_sae}, d_out {cfg.output_width}) needs {list(shape)}"
            )
    saelab_names = {saved: name for name, saved in sae.saelens_renames.items()}
    tensors = {saelab_names.get(name, name): tensor.double() for name, tensor in tensors.items()}
    if not raw.get("apply_b_dec_to_input", True) and not sae.transcoder:
        _fold_input_bias(tensors)
    with torch.no_grad():
        sae.input_scale.fill_(scale)
        if sae.transcoder:
            target_scale = metadata.get("saelab_target_scale", 1.0)
            sae.target_scale.fill_(_positive_number(target_scale, "saelab_target_scale", cfg_path))
        _copy_weights(sae, tensors)
        if (folder / BUFFERS_FILE).exists():
            _load_buffers(sae, folder / BUFFERS_FILE)
    return sae.to(device).eval()


def _fold_input_bias(tensors: dict[str, torch.Tensor]) -> None:
    """SAELens's apply_b_dec_to_input false: u = x W_enc + b_enc = (x − b_dec) W_enc + (b_enc + b_dec W_enc),
    and Gated's magnitude path likewise (its W_enc ⊙ exp(r_mag))."""
    shift = tensors["b_dec"] @ tensors["W_enc"]
    tensors["b_enc"] = tensors["b_enc"] + shift
    if "b_mag" in tensors:
        tensors["b_mag"] = tensors["b_mag"] + shift * tensors["r_mag"].exp()


def _copy_weights(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor]) -> None:
    """Undo `_saved_weights`: the saved tensors, unfolded, into `sae`."""
    fold_in, fold_out = _scales(sae)
    sae.W_dec.copy_(tensors["W_dec"] * fold_out)
    sae.b_enc.copy_(tensors["b_enc"])
    sae.b_dec.copy_(tensors["b_dec"] * fold_out)
    sae.from_saelens_(tensors, fold_in, fold_out)


def _saelab_config(raw: dict[str, Any], metadata: dict[str, Any], cfg_path: Path) -> tuple[SAEConfig, float]:
    if not isinstance(metadata["saelab_config"], dict):
        raise SaelabError(f"{cfg_path}: metadata.saelab_config must be a JSON object")
    fields = dict(metadata["saelab_config"])
    fields.setdefault("input_norm", "none")  # saved before input_norm existed: every SAE was scaled, not normed
    try:
        fields = SAEConfig.own_fields(fields)  # saved with every variant's keys (before they held their own)
        variant_class(fields.get("architecture", "topk")).upgrade_saved_config(fields)
        cfg = config_from_dict(SAEConfig, fields, prefix="metadata.saelab_config")
    except SaelabError as error:
        raise SaelabError(f"{cfg_path}: {error}") from error
    scale = _positive_number(metadata.get("saelab_input_scale"), "saelab_input_scale", cfg_path)
    # saelab wrote every one of these; a value that disagrees is an edit that would be silently ignored.
    written = {key: getattr(cfg, key) for key in ("d_in", "d_sae")}
    if saelens_architecture(cfg) in SAELENS_WITH_K:
        written["k"] = cfg.k
    if cfg.variant.transcoder:
        written["d_out"] = cfg.output_width
    written |= {
        "apply_b_dec_to_input": not cfg.variant.transcoder,
        "normalize_activations": cfg.input_norm,
        "rescale_acts_by_decoder_norm": False,
    }
    for key, value in written.items():
        if raw.get(key) != value or type(raw.get(key)) is not type(value):
            raise SaelabError(
                f"{cfg_path}: {key} is {raw.get(key)!r} but the SAE saelab saved there has {value!r} "
                "(metadata.saelab_config): the file was edited; restore it or save the SAE again"
            )
    for key in ("hook_name", "model_name"):
        if metadata.get(key) != getattr(cfg, key):
            raise SaelabError(
                f"{cfg_path}: metadata.{key} is {metadata.get(key)!r} but metadata.saelab_config says "
                f"{getattr(cfg, key)!r}: the file was edited; restore it or save the SAE again"
            )
    if raw.get("architecture") != saelens_architecture(cfg):
        raise SaelabError(
            f"{cfg_path}: architecture is {raw.get('architecture')!r} but a saelab {cfg.architecture} SAE "
            f"is saved as {saelens_architecture(cfg)!r}"
        )
    return cfg, scale


def _positive_number(value: Any, key: str, cfg_path: Path) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise SaelabError(f"{cfg_path}: metadata.{key} must be a positive number, got {value!r}")
    return float(value)


def _saelens_config(raw: dict[str, Any], metadata: dict[str, Any], cfg_path: Path) -> SAEConfig:
    """The saelab config for a folder SAELens wrote (hook and model names under metadata, or at the top
    level as older SAELens versions wrote them)."""
    saved_as, loads_as = raw.get("architecture"), from_saelens()
    if saved_as not in loads_as:
        raise SaelabError(
            f"{cfg_path}: architecture {saved_as!r} is not one saelab runs (it reads {', '.join(loads_as)})"
        )
    variant = SAE_CLASSES[loads_as[saved_as]]
    input_norm = raw.get("normalize_activations", "none")
    if input_norm not in ("none", "layer_norm"):
        raise SaelabError(
            f"{cfg_path}: normalize_activations is {input_norm!r}; saelab reads 'none' and 'layer_norm' "
            "(fold the scaling into the weights first, e.g. with SAELens's fold_activation_norm_scaling_factor)"
        )
    if raw.get("rescale_acts_by_decoder_norm", False):
        raise SaelabError(
            f"{cfg_path}: rescale_acts_by_decoder_norm true is not supported (fold the decoder norms first)"
        )
    sizes = {key: _positive_int(raw, key, cfg_path) for key in ("d_in", "d_sae")}
    if variant.transcoder:
        sizes["d_out"] = _positive_int(raw, "d_out", cfg_path)
    k = _positive_int(raw, "k", cfg_path) if saved_as in SAELENS_WITH_K else min(SAEConfig.k, sizes["d_sae"])
    names = {key: metadata.get(key) or raw.get(key) or "" for key in ("hook_name", "hook_name_out", "model_name")}
    try:  # k is unused by the architectures without one
        cfg = SAEConfig(architecture=variant.architecture, k=k, input_norm=input_norm, **sizes, **names)
        cfg.validate()
    except SaelabError as error:
        raise SaelabError(f"{cfg_path}: {error}") from error
    return cfg


def _verify_checksums(folder: Path, checksums: Any, cfg_path: Path) -> None:
    """The sha256 that `save_sae` recorded for each tensor file (SAEs saved before it did, or by SAELens,
    have none): a flipped byte in the weights is an error naming the file, not a silently different SAE."""
    if checksums is None:
        return
    if not isinstance(checksums, dict):
        raise SaelabError(f"{cfg_path}: metadata.saelab_sha256 must be a JSON object")
    for name, expected in checksums.items():
        path = folder / str(name)
        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as error:
            raise SaelabError(f"{path}: cannot be read ({error.strerror or error})") from error
        if actual != expected:
            raise SaelabError(
                f"{path}: fails its sha256 check (metadata.saelab_sha256 in {CFG_FILE}): it is corrupted or was "
                "changed after saving; restore it or save the SAE again"
            )


def _positive_int(raw: dict[str, Any], key: str, cfg_path: Path) -> int:
    value = raw.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SaelabError(f"{cfg_path}: {key} must be a positive integer, got {value!r}")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise SaelabError(f"{path}: not found; an SAE folder needs {CFG_FILE} and {WEIGHTS_FILE}") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SaelabError(f"{path}: not readable JSON ({error})") from error
    if not isinstance(data, dict):
        raise SaelabError(f"{path}: must hold a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise SaelabError(f"{path}: not found; an SAE folder needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        return safetensors.torch.load_file(path)
    except Exception as error:  # safetensors raises its own error types for a truncated or garbled file
        raise SaelabError(f"{path}: not a readable safetensors file ({error})") from error


def _load_buffers(sae: SparseAutoencoder, path: Path) -> None:
    tensors = _read_tensors(path)
    buffers = {name: b for name, b in sae.named_buffers() if name not in FOLDED_BUFFERS}
    if set(tensors) != set(buffers):
        raise SaelabError(f"{path}: holds {sorted(tensors)}, but a {sae.cfg.architecture} SAE has {sorted(buffers)}")
    for name, tensor in tensors.items():
        if tensor.dim() == 0 and buffers[name].dim() == 1:  # a count saved before it was kept per group
            tensor = tensor.expand_as(buffers[name])
        if tensor.shape != buffers[name].shape:
            raise SaelabError(f"{path}: {name} has shape {list(tensor.shape)}, expected {list(buffers[name].shape)}")
        buffers[name].copy_(tensor)


def _check_replaceable(folder: Path) -> None:
    """Replace only an earlier SAE folder, never a folder that holds anything else."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SaelabError(f"{folder}: exists and is not a folder; choose another place for the SAE")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in (CFG_FILE, WEIGHTS_FILE, BUFFERS_FILE))
    if foreign:
        raise SaelabError(
            f"{folder}: holds files that are not an SAE's ({', '.join(foreign[:5])}); choose another folder"
        )


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished folder into place; an old one is first moved aside, then deleted."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.old.tmp"
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
