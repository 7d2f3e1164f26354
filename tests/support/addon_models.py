"""Tiny random models of the server's optional add-ons, saved with ``save_pretrained`` so that tests
load them back through ``from_folder``, the path the server takes: a causal LM for the prompt enhancer,
Stable Diffusion's NSFW classifier for the safety checker. Nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from fluxfill_engine.serve.enhance import PLAIN_TEMPLATE
from fluxfill_engine.testing.tiny import TINY_VOCAB_WORDS, tokenizer_from_vocab


def _tiny_tokenizer() -> Any:
    """A word-level tokenizer (built in memory, as the tiny FLUX model's are) whose vocabulary holds the
    template's words too, so the model could echo them. It appends ``<eos>`` to every text, as the tiny
    model's CLIP/T5 tokenizers do: the enhancer must drop it from its input."""
    words = list(TINY_VOCAB_WORDS)
    for token in re.findall(r"\w+|[^\w\s]+", PLAIN_TEMPLATE):
        if token not in words and token != "{" and token != "}":
            words.append(token)
    specials = ["<pad>", "<eos>", "<unk>", "<bos>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    return tokenizer_from_vocab(vocab, 256, pad="<pad>", eos="<eos>", bos="<bos>")


def save_tiny_lm(folder: Path, seed: int = 3, chat_template: str | None = None) -> Path:
    """A tiny random GPT-2 and its tokenizer saved in ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _tiny_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        initializer_range=0.5,  # large random weights: outputs that depend on the prompt
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_clip_config() -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )


def save_tiny_checker(folder: Path, concept: float = 0.5, special: float = 2.0, layout: str = "sd") -> Path:
    """A tiny random StableDiffusionSafetyChecker and CLIPImageProcessor saved in ``folder``: as SD
    checkpoints lay them out (``safety_checker/`` and ``feature_extractor/``) or both in ``folder``
    ("flat"). ``concept`` / ``special``: the thresholds of every concept. Cosine similarities lie in
    [-1, 1], so -2 flags every image and 2 none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    model = StableDiffusionSafetyChecker(tiny_clip_config()).eval()
    model.concept_embeds.data.normal_()
    model.special_care_embeds.data.normal_()
    model.concept_embeds_weights.data.fill_(concept)
    model.special_care_embeds_weights.data.fill_(special)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model_dir = folder / "safety_checker" if layout == "sd" else folder
    processor_dir = folder / "feature_extractor" if layout == "sd" else folder
    model.save_pretrained(model_dir)
    processor.save_pretrained(processor_dir)
    return folder
