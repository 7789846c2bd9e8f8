"""Greedy and sampled generation on top of the streaming state.

The prompt is consumed once; each new token is then one streaming step, so the per-token cost is
bounded by one streaming unit and the memory held does not grow with the length generated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from titans_pretrain.models.titans import TitansLM, TitansState

__all__ = ["generate", "sample_next"]


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``: argmax when ``temperature == 0``,
    else a sample from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: "TitansLM", input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, state: "TitansState | None" = None,
             generator: torch.Generator | None = None, return_state: bool = False):
    """Feed ``input_ids`` ``(B, T)`` (continuing ``state`` if given) and generate ``max_new_tokens``.

    Returns the new tokens ``(B, max_new_tokens)``, or ``(tokens, state)`` with ``return_state``
    (the state then covers the prompt and all generated tokens, ready for the next call)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if input_ids.shape[1] == 0:
        raise ValueError("generate needs at least one prompt token (with a state, the next new token)")
    out = model(input_ids, state=state, return_state=True)
    state, logits = out.state, out.logits
    new_tokens = []
    for i in range(max_new_tokens):
        token = sample_next(logits[:, -1], temperature, top_k, generator)
        new_tokens.append(token)
        if i + 1 < max_new_tokens:
            out = model(token[:, None], state=state, return_state=True)
            state, logits = out.state, out.logits
        else:  # the last token still enters the state, so the caller can continue exactly
            state = model(token[:, None], state=state, return_state=True).state if return_state else state
    tokens = torch.stack(new_tokens, dim=1) if new_tokens else input_ids.new_zeros(input_ids.shape[0], 0)
    return (tokens, state) if return_state else tokens
