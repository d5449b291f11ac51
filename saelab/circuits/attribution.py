"""Node effects: how much the metric changes when one node is zeroed, three ways.

    atp     −vector · g            g = ∂m/∂y at the clean activation (one backward pass, `Trace.gradients`)
    ig      −vector · ḡ            ḡ = the mean of ∂m/∂y over y_α = y − α·N, α = 0, 1/s, …, (s−1)/s, where N is
                                    everything the hook's nodes add (all positions at once): Marks et al.'s
                                    integrated gradients (their left Riemann sum, so s = 1 is AtP). s passes per
                                    hook, batched, from the hook's block on.
    exact   m(y − vector) − m(y)   one pass per node from the hook's block on, batched; the reference.

All three hold the other dictionaries spliced with their errors, i.e. the model downstream is the model
(Marks et al. §2). The integrated gradients of one hook share a path on which every node of the hook
shrinks together, so they estimate each node's effect in the company of the others' partial removal;
`benchmarks/circuits.py` measures how close each estimate comes to `exact`.

Where the estimates fail. Zeroing a latent is a small change, and on SmolLM2 AtP's estimates of latents
are near exact (docs/circuits.md); an error term carries 14–35 % of a residual hook's variance there (the
SAEs' held-out FVU) and zeroing a token's embedding makes another input, so their effects are far from linear and
both estimates miss them, AtP worst. They are few (one per hook and position, one per token), so
`with_exact_errors` measures them exactly (one batched pass each) and keeps the estimate for the latents.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from saelab.circuits.nodes import LATENT, TOKENS, Nodes, linear_effects, vectors
from saelab.circuits.passes import metric_of_copies, replaced_at
from saelab.circuits.trace import EMBED_HOOK, Trace
from saelab.errors import SaelabError

Method = Literal["atp", "ig", "exact"]
METHODS: tuple[Method, ...] = ("atp", "ig", "exact")
# Tokens per batched pass (copies × prompt length): with gradients every block's activations are kept for
# the backward (~60 KB a token a block for SmolLM2: 1024 tokens through 27 blocks ≈ 1.7 GB), without them
# only one block's at a time. Edges backpropagate through the few blocks between two hooks only.
GRADIENT_TOKENS = 1024
EDGE_TOKENS = 2048
FORWARD_TOKENS = 4096


def node_effects(model: Any, trace: Trace, nodes: Nodes, method: Method = "atp", steps: int = 10) -> torch.Tensor:
    """The effect of zeroing each node on the metric, [N], by `method` (`steps`: integrated gradients' path)."""
    if method == "atp":
        return linear_effects(trace, nodes, clean_gradients(trace))
    if method == "ig":
        if steps < 1:
            raise SaelabError(f"--steps {steps}: integrated gradients need at least 1 step (1 is AtP; 10 is usual)")
        sites = nodes.site.unique().tolist()
        return linear_effects(trace, nodes, {site: path_gradient(model, trace, site, steps) for site in sites})
    if method == "exact":
        return exact_effects(model, trace, nodes)
    raise SaelabError(f"--method {method!r} is not one of {', '.join(METHODS)}")


def with_exact_errors(model: Any, trace: Trace, nodes: Nodes, effects: torch.Tensor) -> torch.Tensor:
    """`effects` with the error and token nodes' replaced by their exact effects, [N]."""
    large = (nodes.kind != LATENT).nonzero().flatten()
    refined = effects.clone()
    refined[large] = exact_effects(model, trace, nodes[large])
    return refined


def clean_gradients(trace: Trace) -> dict[int, torch.Tensor]:
    """∂m/∂y at every site (dictionaries by index, TOKENS for the embeddings), [T, d] each."""
    return {TOKENS: trace.embedding_gradient, **dict(enumerate(trace.gradients))}


def site_activation(trace: Trace, site: int) -> tuple[str, int | None, torch.Tensor, torch.Tensor]:
    """(hook, block a pass starts at (None: the tokens), y [T, d], N [T, d] what the site's nodes add)."""
    if site == TOKENS:
        removable = trace.embeddings.clone()
        removable[: trace.first] = 0
        return EMBED_HOOK, None, trace.embeddings, removable
    state, dictionary = trace.states[site], trace.dictionaries[site]
    return dictionary.writes, dictionary.layer, state.output, state.output - state.base


def path_gradient(model: Any, trace: Trace, site: int, steps: int) -> torch.Tensor:
    """ḡ [T, d]: the metric's gradient at `site` averaged over y − α·N, α = k/steps for k = 0 … steps − 1."""
    name, start, y, removable = site_activation(trace, site)
    alphas = torch.arange(steps, dtype=torch.float32) / steps
    total = torch.zeros_like(y, dtype=torch.float32)
    for chunk in alphas.split(max(1, GRADIENT_TOKENS // trace.n_tokens)):
        values = (y - chunk[:, None, None] * removable).detach().requires_grad_(True)
        with torch.enable_grad():
            metric = metric_of_copies(model, trace, start, len(chunk), [replaced_at(name, values)])
            (gradient,) = torch.autograd.grad(metric.sum(), values)
        total += gradient.sum(0).float()
    return total / steps


@torch.no_grad()
def exact_effects(model: Any, trace: Trace, nodes: Nodes) -> torch.Tensor:
    """m(y − vector) − m(y) for each node, [N]: one copy of the prompt per node, and an unedited copy in every
    batch to subtract (so that the batched pass's rounding cancels)."""
    effects = torch.zeros(len(nodes))
    removed = vectors(trace, nodes)
    per_pass = max(2, FORWARD_TOKENS // trace.n_tokens)
    for site in nodes.site.unique().tolist():
        name, start, y, _ = site_activation(trace, site)
        for chunk in nodes.at(site).split(per_pass - 1):
            values = y.expand(len(chunk) + 1, *y.shape).clone()
            values[torch.arange(1, len(chunk) + 1), nodes.position[chunk]] -= removed[chunk].to(y.dtype)
            metric = metric_of_copies(model, trace, start, len(chunk) + 1, [replaced_at(name, values)])
            effects[chunk] = metric[1:] - metric[0]
    return effects
