"""CE loss recovered: how much of the language model's next-token loss survives splicing an SAE in.

On token contexts `[batch, T]` the model's mean next-token loss

    L = mean_{b, t = 0..T−2} −log softmax(logits[b, t])[tokens[b, t + 1]]          (nats)

is measured three ways:

    L_clean   the model as it is
    L_sae     the activation x at `hook` replaced by the SAE's reconstruction x̂, at positions t ≥ 1
    L_zero    the activation at `hook` set to 0 at the same positions (zero ablation)

    CE loss recovered = (L_zero − L_sae) / (L_zero − L_clean)     1: as good as the model; 0: as bad as ablating
    Δ LM loss         = L_sae − L_clean                           nats per predicted token
    KL                = mean_{b, t} D_KL(p_clean(·|b, t) ‖ p_sae(·|b, t))   nats, over the same predictions

Gradient-aware SAEs (g-SAE) select latents with g = ∂L/∂x, which the clean pass then computes
(`saelab.models.gradients`, one backward per batch, the harvest's definition of L): each such SAE
gets a second spliced pass whose reconstruction of row r is made with g_r (`gradient_reconstructions`).

A transcoder replaces one hook (an MLP's output) with a prediction from another hook of the same pass
(what enters the MLP): `Transcoding(reads, predict)` in place of a reconstruction; the spliced pass
then records the rows at `reads` and replaces `hook` with predict(those rows), and L_zero ablates `hook`
(the MLP's output), so CE loss recovered is the transcoder's as a replacement MLP.

Position 0 is left as the model computed it in all three passes: it is the BOS token, an attention
sink whose residual norm is ~100× the others', and the activation store never holds it, so the SAE
never saw one. Every position's prediction is averaged, as in SAELens; the prediction made at
position 0 is then the same in all three losses (nothing before it changed) and cancels from the
fraction recovered.

The clean and zero-ablated passes run once per batch, however many SAEs are compared on it, and
only the clean pass runs the blocks below the hook's: it records what enters the hook's block, and
the zero-ablated and spliced passes run from there (`saelab.models.upper_layers`; on the first batch
a resumed pass is checked against the clean logits, and a model where they differ gets full passes).
Hooks are added with the bridge's `hooks` context manager, so they are gone when a pass ends, however
it ends.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge

from saelab.errors import SaelabError
from saelab.models.gradients import forward_with_gradients
from saelab.models.hooks import parse_hook
from saelab.models.upper_layers import UpperLayers, has_block_stack
from saelab.sae.base import SparseAutoencoder

Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # x: [n, d_model] → x̂: [n, d_model]
# (x: [n, d_model], g = ∂L/∂x: [n, d_model]) → x̂: [n, d_model]
GradientReconstruct = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FIRST_POSITION = 1  # positions before this (the BOS / attention sink) are never replaced


def next_token_loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Σ_{b, t ≤ T−2} −log softmax(logits[b, t])[tokens[b, t + 1]]; logits: [batch, T, vocab], tokens: [batch, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")


class CleanPredictions:
    """The clean pass's next-token distributions on one batch, which each spliced pass is measured against.

    With l a row of logits, lse = log Σ_v exp(l_v) and p_c the clean distribution,

        loss           = lse − l[next token]
        KL(p_c ‖ p)    = Σ_v p_c,v (log p_c,v − log p_v) = p_c·l_c − p_c·l − (lse_c − lse)

    so a spliced pass costs one logsumexp and one dot product per row, where a log-softmax, a KL over the
    vocabulary and a second log-softmax (for the loss) each read and wrote [rows, vocab] floats (about a
    quarter of the evaluation's time on a CPU). Every position is computed (the logits stay a view); the
    last one, which predicts nothing, is dropped from the sums.
    """

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """logits: [batch, T, vocab] of the clean pass; tokens: [batch, T]."""
        flat, self.lse = _rows_and_normalizers(logits)
        self.tokens = tokens
        self.probs = torch.sub(flat, self.lse.reshape(-1, 1)).exp_()  # p_c, [batch·T, vocab] float32
        self.self_dot = _row_dots(self.probs, flat)  # p_c·l_c, [batch·T]
        self.loss_sum = _loss_sum(flat, self.lse, tokens)

    def compare(self, logits: torch.Tensor) -> tuple[float, float]:
        """(Σ next-token loss, Σ KL(p_clean ‖ p)) over the batch's predictions for the logits of another pass."""
        flat, lse = _rows_and_normalizers(logits)
        kl = (self.self_dot - _row_dots(self.probs, flat)) - (self.lse - lse)
        return _loss_sum(flat, lse, self.tokens), float(kl.view(self.tokens.shape)[:, :-1].double().sum())


def _rows_and_normalizers(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [batch, T, vocab] → (the rows [batch·T, vocab] in float32, their logsumexp [batch·T])."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    return flat, torch.logsumexp(flat, dim=-1)


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] · [rows, vocab] row by row → [rows] (a batched product: no [rows, vocab] temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _loss_sum(flat: torch.Tensor, lse: torch.Tensor, tokens: torch.Tensor) -> float:
    """Σ_{b, t ≤ T−2} lse[b, t] − l[b, t, tokens[b, t + 1]]."""
    batch, length = tokens.shape
    next_logit = flat.view(batch, length, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return float((lse.view(batch, length)[:, :-1] - next_logit).double().sum())


@dataclass
class Transcoding:
    """A splice whose replacement of `hook`'s rows is predicted from `reads`'s rows of the same pass.

    predict(inputs: [n, d_in] at `reads`, target: [n, d_out] at the hook, what is replaced) → [n, d_out]."""

    reads: str
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def zero_ablation(x: torch.Tensor) -> torch.Tensor:
    """The "reconstruction" that gives L_zero: x: [n, d] → zeros."""
    return torch.zeros_like(x)


def as_reconstruct(sae: SparseAutoencoder | Reconstruct) -> Reconstruct:
    """An SAE as a function x → x̂ (its `forward(x).reconstruction`); any other callable as it is."""
    if isinstance(sae, SparseAutoencoder):
        return lambda x: sae(x).reconstruction
    return sae


def spliced_logits(
    model: TransformerBridge,
    tokens: torch.Tensor,
    hook: str,
    reconstruct: SparseAutoencoder | Reconstruct | Transcoding | None,
    first_position: int = FIRST_POSITION,
    upper: UpperLayers | None = None,
) -> torch.Tensor:
    """The logits `[batch, T, vocab]` of `tokens: [batch, T]` with x[:, first_position:] at `hook` replaced by
    reconstruct(x) (row by row: [n, d_model] → [n, d_model]; an SAE: its reconstruction); `reconstruct=None`
    runs the model unchanged. Given `upper`, recorded on a clean pass of these tokens from the hook's
    block or one below, only the blocks from there on run."""
    forward = upper if upper is not None else (lambda: model(tokens))
    if reconstruct is None:
        return forward()
    if isinstance(reconstruct, Transcoding):
        record, rows_of = _transcoding_hooks(reconstruct, first_position)
        hooks = [(reconstruct.reads, record)]
    else:
        hooks, rows_of = [], as_reconstruct(reconstruct)

    def replace(x: torch.Tensor, hook: Any) -> torch.Tensor:
        tail = x[:, first_position:]
        patched = x.clone()
        patched[:, first_position:] = rows_of(tail.reshape(-1, x.shape[-1])).reshape(tail.shape).to(x.dtype)
        return patched

    with model.hooks(fwd_hooks=[*hooks, (hook, replace)]):
        return forward()


def _transcoding_hooks(transcoding: Transcoding, first_position: int) -> tuple[Callable, Reconstruct]:
    """A hook that records the rows at `transcoding.reads` in a pass, and target rows → their prediction
    from what it recorded (the hook it reads fires first in the pass)."""
    read: dict[str, torch.Tensor] = {}

    def record(x: torch.Tensor, hook: Any) -> torch.Tensor:
        read["rows"] = x[:, first_position:].reshape(-1, x.shape[-1])
        return x

    return record, lambda target: transcoding.predict(read["rows"], target)


def spliced_loss_sum(
    model: TransformerBridge,
    tokens: torch.Tensor,
    hook: str,
    reconstruct: SparseAutoencoder | Reconstruct | None,
    first_position: int = FIRST_POSITION,
) -> torch.Tensor:
    """The summed next-token loss of `spliced_logits` (see there)."""
    return next_token_loss_sum(spliced_logits(model, tokens, hook, reconstruct, first_position), tokens)


@dataclass
class CELossResult:
    """Mean next-token losses and KLs (nats) over `n_predictions` predicted tokens, clean, zero-ablated, per SAE."""

    clean: float
    zero: float
    sae: dict[str, float]
    n_predictions: int
    kl: dict[str, float] = field(default_factory=dict)  # per SAE label, and "zero"

    def recovered(self, label: str) -> float | None:
        """(L_zero − L_sae) / (L_zero − L_clean); None when ablating the hook does not change the loss."""
        gap = self.zero - self.clean
        return (self.zero - self.sae[label]) / gap if gap != 0 else None

    def delta(self, label: str) -> float:
        """L_sae − L_clean, nats per predicted token."""
        return self.sae[label] - self.clean

    def summary(self, label: str, suffix: str = "") -> dict[str, float | None]:
        """The losses of SAE `label` (a gradient-aware pass is labelled `<label>` + `suffix` too)."""
        key = label + suffix
        return {
            "ce_loss_clean": self.clean,
            f"ce_loss_sae{suffix}": self.sae[key],
            "ce_loss_zero": self.zero,
            f"ce_loss_recovered{suffix}": self.recovered(key),
            f"delta_lm_loss{suffix}": self.delta(key),
            f"kl{suffix}": self.kl[key],
        }


class CELossAccumulator:
    """L_clean, L_zero and each SAE's L_sae and KL at one hook, accumulated batch by batch on the same contexts.

    `gradient_reconstructions` (label → (x, g) → x̂) are run with the gradient g = ∂L/∂x of the clean
    pass, which is then a forward and backward instead of a forward. `resume=False` runs every pass
    through the whole model (what the spliced passes are checked against, and benchmarked against).
    """

    def __init__(
        self,
        model: TransformerBridge,
        hook: str,
        reconstructions: Mapping[str, SparseAutoencoder | Reconstruct | Transcoding],
        first_position: int = FIRST_POSITION,
        gradient_reconstructions: Mapping[str, GradientReconstruct] | None = None,
        resume: bool = True,
    ) -> None:
        self.model, self.hook, self.first_position = model, hook, first_position
        read = [r.reads for r in reconstructions.values() if isinstance(r, Transcoding)]
        self.upper = _upper_layers(model, [hook, *read]) if resume else None
        self._upper_checked = False
        self.reconstructions = {
            label: r if isinstance(r, Transcoding) else as_reconstruct(r) for label, r in reconstructions.items()
        }
        self.gradient_reconstructions = dict(gradient_reconstructions or {})
        labels = [*self.reconstructions, *self.gradient_reconstructions, "zero"]
        self.clean_sum = 0.0
        self.loss_sums = {label: 0.0 for label in labels}
        self.kl_sums = {label: 0.0 for label in labels}
        self.n_predictions = 0

    def update(self, tokens: torch.Tensor) -> None:
        """Run `tokens: [batch, T]` (on the model's device) clean, zero-ablated, and through every SAE."""
        gradient = None
        with self.upper.recording() if self.upper is not None else nullcontext():
            if self.gradient_reconstructions:
                found = forward_with_gradients(self.model, tokens, [self.hook])
                clean_logits, gradient = found.logits, found.gradients[self.hook]
            else:
                with torch.inference_mode():
                    clean_logits = self.model(tokens)
        with torch.inference_mode():
            self._check_upper(clean_logits)
            clean = CleanPredictions(clean_logits, tokens)
            self.clean_sum += clean.loss_sum
            del clean_logits
            passes = {"zero": zero_ablation, **self.reconstructions}
            if gradient is not None:
                rows = gradient[:, self.first_position :].reshape(-1, gradient.shape[-1])
                for label, reconstruct in self.gradient_reconstructions.items():
                    passes[label] = _with_rows(reconstruct, rows)
            for label, reconstruct in passes.items():
                logits = spliced_logits(self.model, tokens, self.hook, reconstruct, self.first_position, self.upper)
                loss_sum, kl_sum = clean.compare(logits)
                self.loss_sums[label] += loss_sum
                self.kl_sums[label] += kl_sum
        self.n_predictions += tokens.shape[0] * (tokens.shape[1] - 1)

    def _check_upper(self, clean_logits: torch.Tensor) -> None:
        """On the first batch: full passes from now on unless a resumed pass reproduces the clean logits."""
        if self.upper is None or self._upper_checked:
            return
        self._upper_checked = True
        if not self.upper.reproduces(clean_logits):
            warnings.warn(
                f"running {type(self.model).__name__} from the block of {self.hook} on does not reproduce its "
                "logits, so every spliced pass runs the whole model (correct, but slower)",
                stacklevel=3,
            )
            self.upper = None

    def result(self) -> CELossResult:
        if self.n_predictions == 0:
            raise ValueError("no contexts were added to the CELossAccumulator")
        n = self.n_predictions
        losses = {label: total / n for label, total in self.loss_sums.items()}
        zero = losses.pop("zero")
        kl = {label: total / n for label, total in self.kl_sums.items()}
        return CELossResult(self.clean_sum / n, zero, losses, n, kl)


def _upper_layers(model: TransformerBridge, hooks: list[str]) -> UpperLayers | None:
    """The blocks from the first of `hooks`'s on, for hooks inside blocks (`blocks.<layer>.<kind>`); else
    None: full passes."""
    if not has_block_stack(model):
        return None
    try:
        return UpperLayers(model, min(parse_hook(hook, len(model.blocks)).layer for hook in hooks))
    except SaelabError:
        return None


def _with_rows(reconstruct: GradientReconstruct, gradient_rows: torch.Tensor) -> Reconstruct:
    """x → reconstruct(x, g) for the rows of one spliced pass (the same rows, in the same order)."""
    return lambda x: reconstruct(x, gradient_rows.to(x.dtype))


def ce_loss_recovered(
    model: TransformerBridge,
    contexts: torch.Tensor | Iterable[torch.Tensor],
    hook: str,
    reconstructions: Mapping[str, SparseAutoencoder | Reconstruct],
    batch_size: int = 8,
    first_position: int = FIRST_POSITION,
    resume: bool = True,
) -> CELossResult:
    """The three losses for every SAE of `reconstructions` on `contexts: [n, T]` token ids, `batch_size` at a
    time (`resume`: see `CELossAccumulator`)."""
    accumulator = CELossAccumulator(model, hook, reconstructions, first_position, resume=resume)
    device = next(model.parameters()).device
    batches = contexts.split(batch_size) if isinstance(contexts, torch.Tensor) else contexts
    for batch in batches:
        accumulator.update(batch.to(device))
    return accumulator.result()
