"""The model's forward pass from one block on, so that a pass spliced at a hook need not rerun the blocks below it.

CE loss recovered runs the model once clean and then once per SAE (and once zero-ablated) with one
hook's activation replaced. Everything below that hook's block is the same in all of these passes,
so the clean pass records what enters block `start` (the residual, and the arguments the model
hands every block: rotary embeddings, attention mask, positions) and each spliced pass runs only
blocks `start`…, the final norm and the unembedding. The model's hook points fire as in a full
pass, so a splice at any hook of block `start` (`hook_resid_pre` … `hook_resid_post`) or above
applies unchanged.

That the resumed pass gives the model's logits is checked, not assumed (`reproduces`): an
architecture with more between its last block and its logits (a logit soft-cap, say) would differ,
and callers then run full passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers.cache_utils import Cache

# How far a resumed pass's logits may stray from the full pass's, relative to the largest logit
# (float32 on a GPU reorders sums; a missing soft-cap or scale is off by far more).
REPRODUCTION_TOLERANCE = 1e-4


def has_block_stack(model: torch.nn.Module) -> bool:
    """Whether `model` exposes the `blocks`, `ln_final` and `unembed` that a resumed pass runs."""
    return all(hasattr(model, name) for name in ("blocks", "ln_final", "unembed"))


class UpperLayers:
    """Blocks `start`… of `model`, its final norm and unembedding, run again on what entered block `start`
    in the last pass made inside `recording()`."""

    def __init__(self, model: TransformerBridge, start: int) -> None:
        if not 0 <= start < len(model.blocks):
            raise ValueError(f"block {start} is not in the model's blocks [0, {len(model.blocks)})")
        self.model, self.start = model, start
        self._args: tuple[Any, ...] | None = None
        self._kwargs: dict[str, Any] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep what enters block `start` in the passes run inside (the last one's is kept)."""

        def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._args, self._kwargs = _reusable(args), _reusable(kwargs)

        handle = self.model.blocks[self.start].register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def __call__(self, copies: int = 1) -> torch.Tensor:
        """The recorded pass's logits `[batch, T, vocab]`, computed from block `start` on (hooks active fire).

        `copies` > 1 runs that many copies of a recorded single sequence as one batch, `[copies, T, vocab]`,
        for hooks that edit each copy differently (the recorded masks and rotary tables broadcast)."""
        if self._args is None:
            raise RuntimeError("nothing was recorded: run the model inside `recording()` first")
        args, kwargs = self._args, dict(self._kwargs)
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        if copies > 1:
            hidden = hidden.expand(copies, *hidden.shape[1:])
        for block in self.model.blocks[self.start :]:
            out = block(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.model.unembed(self.model.ln_final(hidden))

    def reproduces(self, logits: torch.Tensor) -> bool:
        """Whether a resumed pass with no hook gives `logits`, the recorded pass's own (within
        `REPRODUCTION_TOLERANCE` of the largest)."""
        try:
            with torch.no_grad():
                resumed = self()
        except (RuntimeError, TypeError, ValueError, AttributeError):
            return False
        if resumed.shape != logits.shape:
            return False
        scale = float(logits.abs().max()) or 1.0
        return float((resumed.float() - logits.float()).abs().max()) <= REPRODUCTION_TOLERANCE * scale


def _reusable(value: Any) -> Any:
    """A block argument as it can be passed again: tensors detached (no graph kept alive), key-value
    caches dropped and `use_cache` off, so a second pass neither reads nor grows the first's cache."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, Cache):
        return None
    if isinstance(value, tuple | list):
        return type(value)(_reusable(item) for item in value)
    if isinstance(value, dict):
        return {key: False if key == "use_cache" else _reusable(item) for key, item in value.items()}
    return value
