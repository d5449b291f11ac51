"""The variants by name: each variant's module registers its class with one line, `register(MySAE)`.

Everything that must know which variant a config or a saved SAE names asks here (`variant_class`) and
then asks the class (its traits and methods: `SparseAutoencoder`'s docstring). The built-in variants
load on the first question; so do the modules named in `SAELAB_VARIANTS` (comma-separated), which is how
a variant of one's own reaches `saelab` commands run in other processes (docs/own-variant.md).
"""

from __future__ import annotations

import importlib
import os

import torch

from saelab.errors import ConfigError
from saelab.sae.base import SparseAutoencoder
from saelab.sae.config import SAEConfig

PLUGINS_ENV_VAR = "SAELAB_VARIANTS"
BUILT_IN = ("topk", "gsae", "gba", "standard", "jumprelu", "gated", "matryoshka", "transcoder")  # modules
SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {}
_loaded = False


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """File `cls` under `cls.architecture` (a class decorator too). A second class under a taken name is an error."""
    name = cls.architecture
    if not name:
        raise ConfigError(f"{cls.__name__}: set `architecture`, the name configs will use, before registering it")
    if SAE_CLASSES.get(name, cls) is not cls:
        raise ConfigError(
            f"architecture {name!r} is taken by {SAE_CLASSES[name].__name__}; name {cls.__name__} otherwise"
        )
    SAE_CLASSES[name] = cls
    return cls


def variant_class(architecture: str) -> type[SparseAutoencoder]:
    """The class registered as `architecture`; a clear error listing the registered ones otherwise."""
    _load_variants()
    if architecture not in SAE_CLASSES:
        raise ConfigError(
            f"architecture: {architecture!r} is not a registered SAE variant (registered: {', '.join(SAE_CLASSES)}); "
            f"a variant of your own must be imported first, e.g. through {PLUGINS_ENV_VAR}=your_module"
        )
    return SAE_CLASSES[architecture]


def registered(architecture: object) -> type[SparseAutoencoder] | None:
    """The class registered as `architecture`, or None (an unknown name, or not a name at all)."""
    _load_variants()
    return SAE_CLASSES.get(architecture) if isinstance(architecture, str) else None


def architectures() -> list[str]:
    """Every registered variant's name, the built-in ones first."""
    _load_variants()
    return list(SAE_CLASSES)


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SparseAutoencoder:
    """A freshly initialised SAE of `cfg.architecture`."""
    return variant_class(cfg.architecture)(cfg, generator)


def _load_variants() -> None:
    """Import the built-in variants' modules and those named in SAELAB_VARIANTS, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILT_IN:
        importlib.import_module(f"saelab.sae.{module}")
    for module in filter(None, (name.strip() for name in os.environ.get(PLUGINS_ENV_VAR, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"{PLUGINS_ENV_VAR}: cannot import {module!r} ({error})") from error
