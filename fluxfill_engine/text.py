"""Prompt encoding (CLIP pooled + T5 sequence) and an LRU cache of encoded prompts.

The pipeline owns a :class:`PromptEncoder` and hands it its text components for each call
(:class:`TextComponents`: they may be replaced on the pipeline at any time); the encoder returns what it
did (:class:`EncodedPrompt`) and changes nothing on the pipeline.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import get_module_execution_device

if TYPE_CHECKING:
    from .call import PipelineCall

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


@dataclass(frozen=True)
class TextComponents:
    """The pipeline's text components for one call; ``convert_prompt`` is diffusers' textual-inversion
    hook (``maybe_convert_prompt``: tokens of loaded embeddings expanded)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    tokenizer_2: Any
    text_encoder_2: torch.nn.Module
    convert_prompt: Callable[[list[str], Any], str | list[str]]


@dataclass(frozen=True)
class EncodedPrompt:
    """A call's prompts encoded, one embedding per prompt (not per image)."""

    prompt_embeds: torch.Tensor  # T5 [B, S, 4096]
    pooled_prompt_embeds: torch.Tensor  # CLIP [B, 768]
    cache_hit: bool  # served by the prompt cache
    lora_scale: float | None  # the scale the text encoders' peft LoRA layers ran with (``None``: unscaled)


class PromptEncoder:
    """Encodes a call's prompts through an LRU :class:`PromptCache` of ``cache_size`` entries.

    LoRA layers (peft) on the text encoders run scaled by the call's ``joint_attention_kwargs["scale"]``
    and are unscaled afterwards, as diffusers' ``encode_prompt`` does; prompts are not cached while the
    encoders carry adapters (their weights and scales change outside the cache key).
    """

    def __init__(self, cache_size: int) -> None:
        self.cache = PromptCache(cache_size)

    def encode(self, text: TextComponents, call: PipelineCall, device: torch.device) -> EncodedPrompt:
        """``call.prompt`` (and ``prompt_2``, which defaults to it) encoded on ``device``; the call must
        have prompts (not only embeddings)."""
        assert call.prompt is not None, "a call with prompt embeddings has nothing to encode"
        lora_scale = (call.joint_attention_kwargs or {}).get("scale")
        scaled = USE_PEFT_BACKEND and lora_scale is not None
        encoders = [e for e in (text.text_encoder, text.text_encoder_2) if e is not None]
        if scaled:
            for encoder in encoders:
                scale_lora_layers(encoder, lora_scale)
        try:
            prompts = [call.prompt] if isinstance(call.prompt, str) else list(call.prompt)
            prompts_2 = call.prompt_2 or prompts
            prompts_2 = [prompts_2] if isinstance(prompts_2, str) else list(prompts_2)
            embeds, pooled, hit = self._encode_cached(
                text, prompts, prompts_2, device, call.max_sequence_length, lora_scale
            )
        finally:
            if scaled:
                for encoder in encoders:
                    unscale_lora_layers(encoder, lora_scale)
        return EncodedPrompt(embeds, pooled, hit, lora_scale if scaled else None)

    def _encode_cached(
        self,
        text: TextComponents,
        prompts: list[str],
        prompts_2: list[str],
        device: torch.device,
        max_sequence_length: int,
        lora_scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        prompts = list(text.convert_prompt(prompts, text.tokenizer))  # a list in, a list out
        prompts_2 = list(text.convert_prompt(prompts_2, text.tokenizer_2))
        adapters = any(getattr(e, "peft_config", None) for e in (text.text_encoder, text.text_encoder_2))
        key = (
            tuple(prompts),
            tuple(prompts_2),
            max_sequence_length,
            str(device),
            lora_scale,
            len(text.tokenizer),
            len(text.tokenizer_2),
            weights_fingerprint(text.text_encoder),
            weights_fingerprint(text.text_encoder_2),
        )
        cached = None if adapters else self.cache.get(key)
        if cached is not None:
            return (*cached, True)
        pooled = clip_pooled_embeds(text.tokenizer, text.text_encoder, prompts, device)
        embeds = t5_embeds(text.tokenizer_2, text.text_encoder_2, prompts_2, max_sequence_length, device)
        if not adapters:
            self.cache.put(key, (embeds, pooled))
        return embeds, pooled, False
