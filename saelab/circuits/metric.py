"""What a circuit explains: one number read off the logits at one position.

    logprob      m = log softmax(logits[p])[target]                    (no contrast)
    logit_diff   m = logits[p][target] − logits[p][contrast]           (a contrast token given)

The logit difference is the metric of Marks et al. (its softmax normaliser cancels, so it is closer to
linear in the model's activations and its attributions are more accurate); the log-probability needs
no second token. The position p defaults to the prompt's last token: the next-token prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from saelab.errors import SaelabError
from saelab.harvest.packing import text_token_ids


@dataclass(frozen=True)
class Metric:
    """The metric at `position` of the target token id (and the contrast's, for a logit difference)."""

    target: int
    position: int
    contrast: int | None = None

    @property
    def kind(self) -> str:
        return "logprob" if self.contrast is None else "logit_diff"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [batch, T, vocab] → the metric of each sequence, [batch] (float32)."""
        return self.of_row(logits[:, self.position])

    def of_row(self, row: torch.Tensor) -> torch.Tensor:
        """The metric from the logits at its position only, row: [batch, vocab] → [batch]."""
        row = row.float()
        if self.contrast is None:
            return row.log_softmax(-1)[:, self.target]
        return row[:, self.target] - row[:, self.contrast]


def single_token(tokenizer: Any, text: str, role: str) -> int:
    """The id of `text` if the tokenizer makes exactly one token of it, else a one-line error saying what it made."""
    ids = text_token_ids(text, tokenizer)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise SaelabError(
            f"--{role} {text!r} is {len(ids)} tokens {pieces} for this tokenizer; give a single token, e.g. "
            f"{pieces[0] if pieces else ' the'!r} (mind the leading space: ' Paris' and 'Paris' are different tokens)"
        )
    return ids[0]


def resolve_metric(
    tokenizer: Any,
    logits: torch.Tensor,
    target: str | None,
    contrast: str | None = None,
    position: int = -1,
) -> Metric:
    """The metric for the user's strings; `target` None means the model's own top token at `position`.

    logits: [1, T, vocab], the clean pass's (for the default target and to check the position)."""
    n_tokens = logits.shape[1]
    if not -n_tokens <= position < n_tokens:
        raise SaelabError(f"--position {position} is outside the prompt's {n_tokens} tokens (BOS included)")
    position %= n_tokens
    target_id = single_token(tokenizer, target, "target") if target else int(logits[0, position].argmax())
    contrast_id = single_token(tokenizer, contrast, "contrast") if contrast else None
    if contrast_id == target_id:
        raise SaelabError(f"--contrast {contrast!r} is the target token itself; pick another token to compare with")
    return Metric(target_id, position, contrast_id)
