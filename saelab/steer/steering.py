"""Steering a model: interventions attached as hooks for the length of a `with` block.

    with steer(model, [add_feature(sae, 123, 8.0), ablate_feature(sae, 45)]) as steering:
        logits = model(tokens)
        steered = steering.outputs["blocks.15.hook_resid_post"]   # the activation after the edits

One hook function per hook name applies that hook's interventions in the order given, so
interventions compose. The hooks go through the bridge's own `hooks` context manager, which
removes exactly the hooks it added when the block ends, however it ends (an exception inside the
block or inside a hook included): a model is never left steered.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.errors import SaelabError
from saelab.steer.interventions import Intervention


@dataclass
class Steering:
    """What `steer` yields: by hook name, the activation the hook last passed on (after its edits)."""

    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def check_hook(model: Any, name: str) -> None:
    """A SaelabError unless `name` is one of the model's hook points (`model.hook_dict`)."""
    hooks = model.hook_dict
    if name in hooks:
        return
    close = difflib.get_close_matches(name, list(hooks), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SaelabError(
        f"hook {name!r} is not a hook of this model{hint}; residual stream hooks are named "
        f"blocks.<layer>.hook_resid_pre / hook_resid_mid / hook_resid_post with layer 0..{model.cfg.n_layers - 1}"
    )


@contextmanager
def steer(
    model: Any,
    interventions: Sequence[Intervention],
    prompt_length: int | None = None,
    observe: Sequence[str] = (),
) -> Iterator[Steering]:
    """Run the block with `interventions` applied; hooks at `observe` only record their activation.

    `prompt_length`: prompt tokens at the start of every sequence the model runs on, for interventions
    restricted to the prompt or to generated positions (None: every position is a prompt position).
    """
    by_hook: dict[str, list[Intervention]] = {}
    for intervention in interventions:
        by_hook.setdefault(intervention.hook, []).append(intervention)
    for name in observe:
        by_hook.setdefault(name, [])
    for name in by_hook:
        check_hook(model, name)
    steering = Steering()

    def hook_function(name: str, items: list[Intervention]) -> Callable[..., torch.Tensor]:
        def apply(x: torch.Tensor, hook: Any) -> torch.Tensor:
            for item in items:
                x = item.apply(x, prompt_length)
            steering.outputs[name] = x
            return x

        return apply

    fwd_hooks = [(name, hook_function(name, items)) for name, items in by_hook.items()]
    with ExitStack() as stack:
        try:
            stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
        except (KeyError, ValueError) as error:  # a hook point the bridge has but cannot fire in this mode
            raise SaelabError(f"cannot hook {', '.join(by_hook)}: {error}") from error
        yield steering
