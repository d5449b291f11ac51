"""The steering playground: a prompt continued with and without some latents added, clamped or ablated.

For a prompt (BOS + its tokens, P positions) and a list of edits, `compare_steering` runs, holding
the dashboard's model lock (each pass adds hooks to the shared model):

    baseline   greedy continuation of the prompt, unsteered
    steered    greedy continuation while `saelab.steer.steer` applies the edits (prompt_length = P, so
               `positions` "prompt" / "generated" mean what they mean in `saelab steer`)
    changes    the next-token distribution at the last prompt position (P − 1), unsteered (p) and
               steered (q): the `top_n` tokens whose probability rose most (q − p largest) and fell most

The interventions and the generation are `saelab.steer`'s; nothing here edits activations itself.
With `positions="generated"` nothing is edited at P − 1, so there are no changes there by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from saelab.browse.live import context_ids
from saelab.browse.model_lock import MODEL_LOCK
from saelab.errors import SaelabError
from saelab.sae import SparseAutoencoder
from saelab.steer import Intervention, generate, steer
from saelab.steer.interventions import MODES, POSITIONS, Mode, Positions, check_feature, feature_intervention
from saelab.steer.steering import check_hook

MAX_NEW_TOKENS = 64  # each new token reruns the whole sequence (see saelab.steer.generation), twice
MAX_PROMPT_TOKENS = 512  # a pasted book is cut here: the page must stay interactive on a CPU
HUGE = 1e4  # a strength beyond any activation the SAEs here see (their max activations are ~1–100)


@dataclass
class FeatureEdit:
    """One row of the playground: latent `latent`, `mode`, and `value` (add: the coefficient of its
    decoder direction; clamp: the latent's value; ablate: unused)."""

    latent: int
    mode: Mode = "add"
    value: float = 0.0


@dataclass
class TokenChange:
    token_id: int
    token: str
    before: float  # its next-token probability, unsteered
    after: float  # steered

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass
class SteeringComparison:
    prompt_ids: list[int]  # BOS + the prompt's tokens, as run
    baseline_ids: list[int]  # the new tokens only
    steered_ids: list[int]
    baseline_text: str
    steered_text: str
    risen: list[TokenChange]  # rose most first; only tokens that rose
    fallen: list[TokenChange]  # fell most first; only tokens that fell
    kl: float  # D_KL(q ‖ p) at the last prompt position, nats (nan when q is not finite)
    truncated: bool  # the prompt was cut to its first `len(prompt_ids)` tokens
    non_finite: bool  # the steered logits at the last prompt position held NaN or ±inf


def check_edits(sae: SparseAutoencoder, edits: list[FeatureEdit], hook: str, own_hook: str) -> None:
    """A SaelabError naming the first row of `edits` that cannot be applied at `hook`."""
    if not edits:
        raise SaelabError("add a feature row: the latent to steer with")
    for row, edit in enumerate(edits, start=1):
        where = f"feature row {row}"
        if edit.mode not in MODES:
            raise SaelabError(f"{where}: mode must be one of {', '.join(MODES)}, not {edit.mode!r}")
        try:
            check_feature(sae, int(edit.latent))
        except SaelabError as error:
            raise SaelabError(f"{where}: {error}") from error
        if edit.mode != "ablate" and not math.isfinite(edit.value):
            raise SaelabError(f"{where}: the value must be a finite number, not {edit.value}")
        if edit.mode != "add" and hook != own_hook:
            raise SaelabError(
                f"{where}: {edit.mode} edits the SAE's latents, so it needs the SAE's own hook {own_hook}, not {hook}"
            )


def interventions_for(
    sae: SparseAutoencoder, edits: list[FeatureEdit], hook: str, own_hook: str, positions: Positions
) -> list[Intervention]:
    """The `saelab.steer` interventions for `edits` (checked by `check_edits`)."""
    check_edits(sae, edits, hook, own_hook)
    return [feature_intervention(sae, edit.mode, edit.latent, edit.value, hook, positions) for edit in edits]


def prompt_ids(model: Any, prompt: str, max_tokens: int) -> tuple[list[int], bool]:
    """BOS + `prompt`'s tokens (as `saelab.browse.live` and the activation store tokenise), cut to
    `max_tokens`; and whether it was cut."""
    if not prompt.strip():
        raise SaelabError("the prompt is empty: type the start of a text for the model to continue")
    return context_ids(model.tokenizer, prompt, model.tokenizer.bos_token_id is not None, max_tokens)


@torch.inference_mode()
def compare_steering(
    model: Any,
    sae: SparseAutoencoder,
    prompt: str,
    edits: list[FeatureEdit],
    hook: str | None = None,
    positions: Positions = "all",
    max_new_tokens: int = 16,
    top_n: int = 10,
) -> SteeringComparison:
    """Baseline and steered greedy continuations of `prompt` and the next-token probability changes
    at its last position (see the module docstring). `hook`: where `add` edits (default: the SAE's own
    hook); clamp and ablate edit the SAE's latents, so only at its own hook. Bad input is a SaelabError."""
    own_hook = sae.cfg.hook_name
    if not own_hook:
        raise SaelabError(f"{sae.cfg.label} does not record the hook it was trained on")
    hook = hook or sae.cfg.hook_name_out or own_hook  # a transcoder's direction lives at its output hook
    if positions not in POSITIONS:
        raise SaelabError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise SaelabError(f"max new tokens must be in 1..{MAX_NEW_TOKENS}, not {max_new_tokens}")
    check_hook(model, hook)
    interventions = interventions_for(sae, edits, hook, own_hook, positions)
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or MAX_PROMPT_TOKENS + MAX_NEW_TOKENS)
    ids, truncated = prompt_ids(model, prompt, min(MAX_PROMPT_TOKENS, n_ctx - max_new_tokens))
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    length = tokens.shape[1]

    with MODEL_LOCK:
        before = torch.softmax(model(tokens)[0, -1].float(), dim=-1)
        baseline = generate(model, tokens, max_new_tokens)[0, length:].tolist()
        with steer(model, interventions, prompt_length=length):
            logits = model(tokens)[0, -1].float()
            steered = generate(model, tokens, max_new_tokens)[0, length:].tolist()

    non_finite = not bool(torch.isfinite(logits).all())
    after = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    kl = math.nan if non_finite else float((after * (after.clamp_min(1e-30).log() - before.log())).sum())
    change = after - before.to(after.device)
    decode = model.tokenizer.decode

    def listed(order: torch.Tensor, rising: bool) -> list[TokenChange]:
        rows = []
        for i in order.tolist():
            if (change[i] > 0) if rising else (change[i] < 0):
                rows.append(TokenChange(i, decode([i]), float(before[i]), float(after[i])))
        return rows

    n = min(top_n, change.numel())
    return SteeringComparison(
        prompt_ids=ids,
        baseline_ids=baseline,
        steered_ids=steered,
        baseline_text=decode(baseline),
        steered_text=decode(steered),
        risen=listed(change.topk(n).indices, rising=True),
        fallen=listed((-change).topk(n).indices, rising=False),
        kl=max(kl, 0.0) if not non_finite else kl,
        truncated=truncated,
        non_finite=non_finite,
    )
