"""Prompt encoding (CLIP pooled + T5 sequence) and an LRU cache of encoded prompts."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import get_module_execution_device

if TYPE_CHECKING:
    from .call import PipelineCall
    from .pipeline import FluxFillPipeline

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


def encode_text(
    pipe: FluxFillPipeline, call: PipelineCall, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A call's prompts encoded: one embedding per prompt (not per image), and whether the pipeline's
    prompt cache served them. LoRA layers on the text encoders are scaled by the call's scale."""
    lora_scale = (call.joint_attention_kwargs or {}).get("scale")
    uses_peft = USE_PEFT_BACKEND and lora_scale is not None
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    if uses_peft:
        pipe._lora_scale = lora_scale
        for encoder in encoders:
            scale_lora_layers(encoder, lora_scale)
    try:
        prompts = [call.prompt] if isinstance(call.prompt, str) else list(call.prompt)
        prompts_2 = call.prompt_2 or prompts
        prompts_2 = [prompts_2] if isinstance(prompts_2, str) else list(prompts_2)
        return _encode_cached(pipe, prompts, prompts_2, device, call.max_sequence_length, lora_scale)
    finally:
        if uses_peft:
            for encoder in encoders:
                unscale_lora_layers(encoder, lora_scale)


def _encode_cached(
    pipe: FluxFillPipeline,
    prompts: list[str],
    prompts_2: list[str],
    device: torch.device,
    max_sequence_length: int,
    lora_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    prompts = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    prompts_2 = pipe.maybe_convert_prompt(prompts_2, pipe.tokenizer_2)
    adapters = any(getattr(e, "peft_config", None) for e in (pipe.text_encoder, pipe.text_encoder_2))
    key = (
        tuple(prompts),
        tuple(prompts_2),
        max_sequence_length,
        str(device),
        lora_scale,
        len(pipe.tokenizer),
        len(pipe.tokenizer_2),
        weights_fingerprint(pipe.text_encoder),
        weights_fingerprint(pipe.text_encoder_2),
    )
    cached = None if adapters else pipe.prompt_cache.get(key)
    if cached is not None:
        return (*cached, True)
    pooled = clip_pooled_embeds(pipe.tokenizer, pipe.text_encoder, prompts, device)
    embeds = t5_embeds(pipe.tokenizer_2, pipe.text_encoder_2, prompts_2, max_sequence_length, device)
    if not adapters:
        pipe.prompt_cache.put(key, (embeds, pooled))
    return embeds, pooled, False
