"""Attention backends. Inputs are ``[B, L, H, D]`` (straight out of the fused QKV projection)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention (scale ``1/sqrt(D)``) with heads merged: ``[B, L, H*D]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}


def get_attention(name: str) -> AttentionFn:
    """The attention function named ``name``; ``ValueError`` listing the available ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; available: {sorted(BACKENDS)}")
    return BACKENDS[name]
