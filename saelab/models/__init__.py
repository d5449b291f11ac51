"""Language models behind a TransformerLens hook interface.

`load_model` imports the model stack (transformer-lens, transformers) on first use, not with this package,
so that light readers (`saelab doctor`, the offline model's cache folder) do not pay for it or depend on it.
"""

from typing import Any

from saelab.models.device import resolve_device
from saelab.models.hooks import BLOCK_HOOKS, HookPoint, parse_hook, stop_at_layer
from saelab.models.smollm2 import SMOLLM2_SPEC

__all__ = ["BLOCK_HOOKS", "SMOLLM2_SPEC", "HookPoint", "load_model", "parse_hook", "resolve_device", "stop_at_layer"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from saelab.models.loading import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
