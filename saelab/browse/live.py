"""Any text, run live through the model and an SAE: which latents fire on which token, and how strongly.

The text is tokenised as the activation store's contexts were (no special tokens, BOS first when
the store prepended one), the model runs just far enough to reach the SAE's hook, and the SAE
encodes the activation at every position from `first_position` on. Earlier positions (the BOS, an
attention sink with ~100× the norm of the rest, which the store never holds and the SAE never
saw) are not encoded: their activations are None, as in the feature store's contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from saelab.errors import SaelabError
from saelab.harvest.packing import text_token_ids
from saelab.models import parse_hook, stop_at_layer
from saelab.sae import SparseAutoencoder

MAX_TOKENS = 512  # a pasted book is cut here: the page must stay interactive on a CPU


@dataclass
class LatentOnText:
    """One latent's strongest firing on a text."""

    latent: int
    max_activation: float
    position: int  # where the max is
    token: str
    n_tokens: int  # how many tokens it fires on


@dataclass
class TextActivations:
    """`latents[t]` is the SAE's latent vector at token t (`[n_tokens, d_sae]`, zeros before `first_position`)."""

    token_ids: list[int]
    tokens: list[str]
    latents: torch.Tensor
    first_position: int
    truncated: bool  # the text was longer than `max_tokens` and was cut

    def feature(self, index: int) -> list[float | None]:
        """Latent `index`'s activation at every token; None where nothing was encoded (the BOS)."""
        if not 0 <= index < self.latents.shape[1]:
            raise SaelabError(f"latent {index} is not in this SAE; it has latents [0, {self.latents.shape[1]})")
        values = self.latents[:, index].tolist()
        return [None if t < self.first_position else v for t, v in enumerate(values)]

    def strongest(self, n: int = 20) -> list[LatentOnText]:
        """The `n` latents with the largest activation anywhere in the text, strongest first."""
        encoded = self.latents[self.first_position :]
        if encoded.numel() == 0:
            return []
        best, where = encoded.max(dim=0)
        firing = (encoded > 0).sum(dim=0)
        found = []
        for f in torch.argsort(best, descending=True, stable=True)[:n].tolist():
            if best[f] > 0:
                position = self.first_position + int(where[f])
                found.append(LatentOnText(f, float(best[f]), position, self.tokens[position], int(firing[f])))
        return found

    def by_token(self, per_token: int = 5) -> list[tuple[int, str, list[tuple[int, float]]]]:
        """For each encoded token: `(position, token, [(latent, activation), …])`, its `per_token` strongest latents."""
        rows = []
        for t in range(self.first_position, len(self.tokens)):
            values, latents = self.latents[t].topk(min(per_token, self.latents.shape[1]))
            pairs = [(int(f), float(v)) for f, v in zip(latents.tolist(), values.tolist(), strict=True) if v > 0]
            rows.append((t, self.tokens[t], pairs))
        return rows


def encode_text(
    model: TransformerBridge,
    sae: SparseAutoencoder,
    hook: str,
    text: str,
    prepend_bos: bool = True,
    first_position: int = 1,
    max_tokens: int = MAX_TOKENS,
) -> TextActivations:
    """Tokenise `text` as the store's contexts were and encode it (`encode_tokens`).

    An empty text is a SaelabError; text beyond `max_tokens` tokens, or the model's context, is cut
    (`truncated` says so).
    """
    if not text.strip():
        raise SaelabError("the text is empty: type a phrase to run through the model and the SAE")
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or max_tokens)  # never past the model's context
    ids, truncated = context_ids(model.tokenizer, text, prepend_bos, min(max_tokens, n_ctx))
    result = encode_tokens(model, sae, hook, ids, first_position if prepend_bos else 0)
    result.truncated = truncated
    return result


def context_ids(tokenizer: Any, text: str, prepend_bos: bool, max_tokens: int) -> tuple[list[int], bool]:
    """BOS (when `prepend_bos`) + `text`'s token ids as the store's contexts were made, cut to
    `max_tokens`; and whether it was cut."""
    ids = text_token_ids(text, tokenizer)
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise SaelabError("the model's tokenizer has no BOS token, but the SAE's store prepended one")
        ids = [tokenizer.bos_token_id, *ids]
    return ids[:max_tokens], len(ids) > max_tokens


@torch.no_grad()
def encode_tokens(
    model: TransformerBridge, sae: SparseAutoencoder, hook: str, ids: list[int], first_position: int = 1
) -> TextActivations:
    """Run token `ids` (BOS included when wanted) through `model` up to `hook`; encode positions ≥ `first_position`."""
    point = parse_hook(hook, model.cfg.n_layers)
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(
        torch.tensor([ids], device=device),
        names_filter=[point.name],
        stop_at_layer=stop_at_layer([point]),
        return_cache_object=False,
    )
    x = cache[point.name][0]  # [n_tokens, d_model]
    if x.shape[-1] != sae.cfg.d_in:
        raise SaelabError(f"{hook} has width {x.shape[-1]} but the SAE reads {sae.cfg.d_in}")
    latents = torch.zeros(len(ids), sae.cfg.d_sae)
    if len(ids) > first_position:
        latents[first_position:] = sae.encode_rows(x[first_position:])
    tokens = model.tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return TextActivations(list(ids), tokens, latents, first_position, truncated=False)
