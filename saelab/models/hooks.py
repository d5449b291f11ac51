"""Hook points in TransformerLens vocabulary, and how far a forward pass must run to reach them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from saelab.errors import SaelabError

# The block-level hooks an SAE is usually trained on, in the order they fire inside a block.
BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
_HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(\w+)$")


@dataclass(frozen=True)
class HookPoint:
    """A hook such as `blocks.15.hook_resid_post`, split into its layer and its name in the block."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"


def parse_hook(name: str, n_layers: int) -> HookPoint:
    """Parse and check a hook name against a model with `n_layers` blocks."""
    match = _HOOK_PATTERN.match(name)
    if match is None or match.group(2) not in BLOCK_HOOKS:
        raise SaelabError(
            f"hook '{name}' is not supported; use blocks.<layer>.<kind> with kind one of {', '.join(BLOCK_HOOKS)}"
        )
    layer = int(match.group(1))
    if layer >= n_layers:
        raise SaelabError(f"hook '{name}' asks for layer {layer} but the model has layers 0..{n_layers - 1}")
    return HookPoint(layer, match.group(2))


def stop_at_layer(hooks: list[HookPoint]) -> int:
    """The `stop_at_layer` argument that runs just far enough for every hook to fire."""
    return max(hook.layer for hook in hooks) + 1
