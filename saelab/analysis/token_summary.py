"""The token-summary explainer: a latent described by the tokens it fires on and the tokens it promotes.

    fires on: "def", "class" · promotes: " self", "("

"fires on" lists the most frequent tokens at the activation peaks of the latent's first `n_contexts`
top-activating contexts (the ones an LLM explainer reads: the held-out contexts the scorer tests on are
never looked at), most frequent first, ties by the strongest context. "promotes" lists the first tokens
of its logit effects (the decoder direction through the final norm and W_U). Tokens are quoted as JSON
strings, so a leading space or a newline shows.

It is deterministic, costs no model call, and is scored by the same scorer, on the same examples and
against the same shuffled control as an LLM's explanation (`saelab explain`): with a weak offline scorer
it is the label to beat, and where the LLM does not beat it, it is what the dashboard shows.
"""

from __future__ import annotations

import json
from collections import Counter

from saelab.analysis.feature_store import FeaturePage

EXPLAINER = "token-summary"
N_FIRED = 3
N_PROMOTED = 3


def summary_text(fired: list[str], promoted: list[str], n_fired: int = N_FIRED, n_promoted: int = N_PROMOTED) -> str:
    """The summary of a latent from its peak tokens (strongest context first) and its promoted tokens
    (largest logit effect first); "" when it has neither (a dead latent with no logit effects)."""
    counts = Counter(fired)
    first_seen = {token: i for i, token in reversed(list(enumerate(fired)))}
    common = sorted(counts, key=lambda token: (-counts[token], first_seen[token]))[:n_fired]
    parts = []
    if common:
        parts.append("fires on: " + ", ".join(_quoted(token) for token in common))
    if promoted[:n_promoted]:
        parts.append("promotes: " + ", ".join(_quoted(token) for token in promoted[:n_promoted]))
    return " · ".join(parts)


def token_summary(page: FeaturePage, n_contexts: int) -> str:
    """The summary of `page`'s latent from its first `n_contexts` top contexts and its logit effects."""
    fired = [w.tokens[w.highlight] for w in page.top_contexts[:n_contexts]]
    return summary_text(fired, [effect.token for effect in page.positive_logits])


def _quoted(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)
