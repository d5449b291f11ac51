"""The nodes of a traced prompt, one row each, and what each one adds to its hook.

    latent   (k, t, i)   latent i of dictionary k at position t, active (z > 0)   adds z_i · W_dec[i] / c_t
    error    (k, t)      dictionary k's error at position t                         adds ε_t
    token    (t)         the token embedding at position t                          is e_t

for positions `first` ≤ t ≤ the metric's position (later positions cannot move it). A node's *effect* is
the change of the metric when the node is zeroed (the error removed, the embedding zeroed); what a node
adds is the vector whose removal that is (`vectors`). Given the metric's gradient g at the node's hook,
the linear estimate of the effect is −(vector · g) (`linear_effects`: AtP with the clean gradient, IG with
the gradient averaged along a path).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from saelab.circuits.trace import Trace

LATENT, ERROR, TOKEN = 0, 1, 2
KIND_NAMES = ("latent", "error", "token")
TOKENS = -1  # the `site` of token nodes; dictionaries are sites 0 … n − 1


@dataclass
class Nodes:
    """Node rows: kind [N] (LATENT, ERROR, TOKEN), site [N] (dictionary index, TOKENS for tokens), position [N],
    latent [N] (−1 but for latents), activation [N] (z for a latent, ‖ε‖ for an error, ‖e‖ for a token)."""

    kind: torch.Tensor
    site: torch.Tensor
    position: torch.Tensor
    latent: torch.Tensor
    activation: torch.Tensor

    def __len__(self) -> int:
        return len(self.kind)

    def __getitem__(self, index: torch.Tensor | slice) -> Nodes:
        return Nodes(*(getattr(self, f.name)[index] for f in fields(self)))

    def at(self, site: int) -> torch.Tensor:
        """Indices of the nodes at `site` [n]."""
        return (self.site == site).nonzero().flatten()

    def key(self, index: int) -> tuple[int, int, int, int]:
        """(kind, site, position, latent) of node `index`: the same node in two tables has the same key."""
        return tuple(int(getattr(self, name)[index]) for name in ("kind", "site", "position", "latent"))


def enumerate_nodes(trace: Trace) -> Nodes:
    """Every node of `trace`, dictionaries in forward order (latents, then errors), then the tokens."""
    positions = torch.arange(trace.first, trace.metric.position + 1)
    parts = []
    for k, state in enumerate(trace.states):
        z = state.latents[positions]
        t, i = z.nonzero(as_tuple=True)
        parts.append((LATENT, k, positions[t], i, z[t, i]))
        parts.append((ERROR, k, positions, torch.full_like(positions, -1), state.error[positions].norm(dim=-1)))
    embeddings = trace.embeddings[positions].float()
    parts.append((TOKEN, TOKENS, positions, torch.full_like(positions, -1), embeddings.norm(dim=-1)))
    return Nodes(
        kind=torch.cat([torch.full_like(p[2], p[0]) for p in parts]),
        site=torch.cat([torch.full_like(p[2], p[1]) for p in parts]),
        position=torch.cat([p[2] for p in parts]),
        latent=torch.cat([p[3] for p in parts]),
        activation=torch.cat([p[4].float() for p in parts]),
    )


def vectors(trace: Trace, nodes: Nodes) -> torch.Tensor:
    """What each node adds to its hook, [N, d] (model units): removing it is zeroing the node."""
    out = torch.zeros(len(nodes), trace.embeddings.shape[-1])
    for site in nodes.site.unique().tolist():
        index = nodes.at(site)
        t = nodes.position[index]
        if site == TOKENS:
            out[index] = trace.embeddings[t].float()
            continue
        state, W_dec = trace.states[site], trace.dictionaries[site].sae.W_dec.detach()
        latent = nodes.kind[index] == LATENT
        rows, cols = t[latent], nodes.latent[index][latent]
        out[index[latent]] = (state.latents[rows, cols, None] * W_dec[cols] / state.scale[rows]).float()
        out[index[~latent]] = state.error[t[~latent]].float()
    return out


def linear_effects(trace: Trace, nodes: Nodes, gradients: dict[int, torch.Tensor]) -> torch.Tensor:
    """−(vector · g) for each node, g = gradients[site][position] ([T, d] per site, TOKENS included), [N].

    For latents this is −z_i (g_t / c_t) · W_dec[i], computed without forming the vectors."""
    effects = torch.zeros(len(nodes))
    for site in nodes.site.unique().tolist():
        index = nodes.at(site)
        t, g = nodes.position[index], gradients[site].float()
        if site == TOKENS:
            effects[index] = -(trace.embeddings[t].float() * g[t]).sum(-1)
            continue
        state, W_dec = trace.states[site], trace.dictionaries[site].sae.W_dec.detach().float()
        latent = nodes.kind[index] == LATENT
        rows, cols = t[latent], nodes.latent[index][latent]
        along = ((g[rows] / state.scale[rows].float()) * W_dec[cols]).sum(-1)
        effects[index[latent]] = -state.latents[rows, cols].float() * along
        effects[index[~latent]] = -(state.error[t[~latent]].float() * g[t[~latent]]).sum(-1)
    return effects
