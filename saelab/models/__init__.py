"""Language models behind a TransformerLens hook interface."""

from saelab.models.hooks import BLOCK_HOOKS, HookPoint, parse_hook, stop_at_layer
from saelab.models.loading import load_model, resolve_device
from saelab.models.smollm2 import SMOLLM2_SPEC

__all__ = ["BLOCK_HOOKS", "SMOLLM2_SPEC", "HookPoint", "load_model", "parse_hook", "resolve_device", "stop_at_layer"]
