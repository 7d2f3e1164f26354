"""Prompt encoding (CLIP pooled + T5 sequence) and an LRU cache of encoded prompts."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from diffusers.utils.torch_utils import get_module_execution_device

logger = logging.getLogger(__name__)
_LOGGED_CHARS = 200


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
    input_ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_length=False,
        return_overflowing_tokens=False,
        return_tensors="pt",
    ).input_ids
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] >= input_ids.shape[-1] and not torch.equal(input_ids, untruncated):
        removed = " | ".join(tokenizer.batch_decode(untruncated[:, max_length - 1 : -1]))
        if len(removed) > _LOGGED_CHARS:  # a long prompt must not write its whole text per request
            removed = f"{removed[:_LOGGED_CHARS]}... ({len(removed)} characters)"
        logger.warning("part of the prompt was truncated to %d %s tokens: %s", max_length, what, removed)
    return input_ids


def clip_pooled_embeds(
    tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """CLIP's pooled output ``[B, 768]`` (the end-of-text token's hidden state, projected)."""
    input_ids = _tokenize(tokenizer, prompts, tokenizer.model_max_length, "CLIP")
    output = text_encoder(input_ids.to(get_module_execution_device(text_encoder)), output_hidden_states=False)
    return output.pooler_output.to(dtype=text_encoder.dtype, device=device)


def t5_embeds(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    prompts: list[str],
    max_sequence_length: int,
    device: torch.device,
) -> torch.Tensor:
    """T5's last hidden state ``[B, max_sequence_length, 4096]`` (prompts padded to the full length)."""
    input_ids = _tokenize(tokenizer, prompts, max_sequence_length, "T5")
    hidden = text_encoder(
        input_ids.to(get_module_execution_device(text_encoder)), output_hidden_states=False
    )[0]
    return hidden.to(dtype=text_encoder.dtype, device=device)


def weights_fingerprint(module: torch.nn.Module) -> tuple[int, ...]:
    """Changes whenever ``module``'s weights may have: a parameter replaced (object identity), its
    tensor replaced (storage pointer), or modified in place (autograd version counter, bumped by
    ``load_state_dict``, ``fuse_lora`` and every other in-place write)."""
    parts: list[int] = [id(module)]
    for param in module.parameters():
        parts += [id(param), param.data_ptr(), param._version]
    return tuple(parts)


class PromptCache:
    """A small LRU map from a prompt key to its encoded ``(prompt_embeds, pooled_prompt_embeds)``.

    Entries hold the embeddings of one image per prompt; callers repeat them per image. Size 0 stores
    nothing. ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.max_size <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
