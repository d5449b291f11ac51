"""Generation for steering experiments: a plain loop that reruns the whole sequence at each step.

Why not a KV cache. A cached step runs the model on the newest token alone, so a hook would see
`[batch, 1, d]` and could not tell which position it is editing; rerunning the sequence gives every
hook absolute positions (so "prompt" and "generated" positions mean what they say) at a cost that is
small for the short continuations steering needs (16 tokens after a short prompt: 16 passes of
< 64 tokens). It also sidesteps the bridge's cached path, which is wrong for SmolLM2 here
(TransformerLens 4.3.0, transformers 5.24.0): after "def read_file(path):\n    with open(path) as" a
cached step's logits differ from a full pass's by 27, and greedy `generate` continues with " f-----"
where full passes give " f:\n".
"""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def generate(
    model: Any,
    tokens: torch.Tensor,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    stop_at_eos: bool = True,
) -> torch.Tensor:
    """`tokens: [batch, P]` followed by up to `max_new_tokens` new tokens: `[batch, P + n]`.

    Greedy (argmax) unless `do_sample`; sampling draws from softmax(logits / temperature), restricted
    to the `top_k` most likely tokens when top_k > 0, with `generator` (seed it for reproducibility).
    Rows that have produced the EOS token are padded with it; the loop stops when every row has.
    """
    eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits = model(tokens)[:, -1].float()
        if do_sample:
            logits = logits / temperature
            if top_k > 0:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -torch.inf)
            probs = torch.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs.cpu(), 1, generator=generator).to(tokens.device).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        if eos is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos), next_token)
            finished |= next_token == eos
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if eos is not None and bool(finished.all()):
            break
    return tokens
