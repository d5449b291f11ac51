"""Dictionaries spliced into a forward pass: at each written hook the activation is split into nodes and
rebuilt from them (`saelab.circuits.dictionaries`), possibly edited on the way.

An edit is a function `on_write(k, x, y) → y'` of what dictionary k reads (x) and what its written hook
carries (y), applied where the written hook fires; a dictionary that reads a hook another one writes
reads it as edited. Dictionaries left out of `sites` are not touched: spliced with their errors they would
compute the same thing. With no edit (`rebuild`), the spliced model is the model: the logits agree to
float rounding (`spliced_logits`; the tests hold it to 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from saelab.circuits.dictionaries import Dictionary, HookState, split_activation

OnWrite = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (k, x [.., T, d_in], y [.., T, d_out]) → y'
Hooks = list[tuple[str, Callable[..., torch.Tensor]]]


def dictionary_hooks(dictionaries: list[Dictionary], on_write: OnWrite, sites: Iterable[int] | None = None) -> Hooks:
    """One hook per hook name that applies `on_write` of each dictionary in `sites` (default all) writing there."""
    sites = range(len(dictionaries)) if sites is None else sorted(sites)
    seen: dict[str, torch.Tensor] = {}  # what each hook passed on, for dictionaries that read it later
    names = dict.fromkeys(name for k in sites for name in (dictionaries[k].reads, dictionaries[k].writes))

    def hook_for(name: str) -> Callable[..., torch.Tensor]:
        writers = [k for k in sites if dictionaries[k].writes == name]

        def hook(y: torch.Tensor, hook: Any) -> torch.Tensor:
            incoming = y
            for k in writers:
                reads = dictionaries[k].reads
                y = on_write(k, incoming if reads == name else seen[reads], y)
            seen[name] = y
            return y

        return hook

    return [(name, hook_for(name)) for name in names]


def rebuild(dictionaries: list[Dictionary], first: int, states: dict[int, HookState] | None = None) -> OnWrite:
    """The plain splice: y' = base + zW/c + ε, each dictionary's nodes as this pass makes them (kept in `states`)."""

    def on_write(k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state = split_activation(dictionaries[k], x, y, first)
        if states is not None:
            states[k] = state
        return state.with_nodes(state.latents, state.error, dictionaries[k].sae.W_dec)

    return on_write


@torch.no_grad()
def spliced_logits(model: Any, tokens: torch.Tensor, dictionaries: list[Dictionary], first: int) -> torch.Tensor:
    """The logits [batch, T, vocab] of `tokens` with every dictionary spliced in, errors kept."""
    with model.hooks(fwd_hooks=dictionary_hooks(dictionaries, rebuild(dictionaries, first))):
        return model(tokens)
