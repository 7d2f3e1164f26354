"""A tiny random-weight FLUX Fill model, built in code: for tests, the CLI demo and CPU benchmarks.

It has the real model's structure (guidance embedding, double and single stream blocks, a VAE with the
real scale factor 8 so the mask packs to 256 channels, 16 latent channels, CLIP pooled + T5 sequence
text) at toy widths. Its tokenizers are built in memory, so nothing is downloaded. Its images are
noise: the point is that every stage of the real path runs.

:func:`mid_components` builds a larger one (4 + 8 blocks, width 512, 256 image + 128 text tokens at
256x256) for CPU benchmarks (``fluxfill bench variants --preset cpu-mid``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from ..architecture import SCHEDULER_CONFIG

TINY_VOCAB_WORDS = [
    "a",
    "white",
    "paper",
    "cup",
    "on",
    "the",
    "table",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "photo",
    "of",
    "an",
    "image",
    "with",
    "sky",
    "tree",
    "house",
    "car",
    "road",
    "sea",
    "sun",
    "moon",
    "star",
    "flower",
    "bird",
    "in",
    "front",
    "behind",
    "small",
    "large",
    "old",
    "new",
    "bright",
    "dark",
]


def _word_level_tokenizer(model_max_length: int, pad: str, bos: str | None, eos: str) -> Any:
    specials = [pad, eos, "<unk>"] + ([bos] if bos else [])
    vocab = {token: i for i, token in enumerate(specials + list(TINY_VOCAB_WORDS))}
    return tokenizer_from_vocab(vocab, model_max_length, pad=pad, eos=eos, bos=bos)


def tokenizer_from_vocab(
    vocab: dict[str, int],
    model_max_length: int,
    pad: str,
    eos: str,
    bos: str | None = None,
    unk: str = "<unk>",
) -> Any:
    """A whitespace word-level ``PreTrainedTokenizerFast`` over ``vocab``, built in memory (no download),
    adding ``bos``/``eos`` around each text as CLIP and T5 tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        template, special_ids = f"{bos} $A {eos}", [(bos, vocab[bos]), (eos, vocab[eos])]
    else:
        template, special_ids = f"$A {eos}", [(eos, vocab[eos])]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=special_ids)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        **({"bos_token": bos} if bos else {}),
    )


TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 384,  # 64 noise-latent + 64 masked-image-latent + 256 mask channels, as in the real model
    "out_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}


def _build_components(
    seed: int,
    dtype: torch.dtype,
    transformer: dict[str, Any],
    vae: dict[str, Any],
    clip: dict[str, Any],
    t5: dict[str, Any],
) -> dict[str, Any]:
    """The seven pipeline components with the given sizes; fixed seeds per component."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer_model = FluxTransformer2DModel(**transformer)
    torch.manual_seed(seed + 1)
    vae_model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        # Four blocks: the real scale factor 8. diffusers annotates these as `Tuple[str]` (one block)
        # while it takes one name per block.
        down_block_types=cast("tuple[str]", ("DownEncoderBlock2D",) * 4),
        up_block_types=cast("tuple[str]", ("UpDecoderBlock2D",) * 4),
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **vae,
    )
    tokenizer = _word_level_tokenizer(77, pad="<pad>", bos="<bos>", eos="<eos>")
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=transformer["pooled_projection_dim"],
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.convert_tokens_to_ids("<bos>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<eos>"),
            pad_token_id=tokenizer.pad_token_id,
            **clip,
        )
    )
    tokenizer_2 = _word_level_tokenizer(512, pad="<pad>", bos=None, eos="</s>")
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=transformer["joint_attention_dim"],
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.convert_tokens_to_ids("</s>"),
            **t5,
        )
    )
    # Seen as Modules: diffusers decorates ModelMixin.to with functools.wraps(nn.Module.to), which types
    # it with Module.to's unbound signature (`self` first); the call still runs each model's own `to`.
    models = cast("tuple[torch.nn.Module, ...]", (transformer_model, vae_model, text_encoder, text_encoder_2))
    for module in models:
        module.eval()
        if dtype != torch.float32:
            module.to(dtype)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        "vae": vae_model,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer_model,
    }


def tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The seven components of a FLUX Fill pipeline, tiny and random, with fixed seeds.

    Keys are the constructor arguments of ``FluxFillPipeline``: ``scheduler``, ``vae``,
    ``text_encoder``, ``tokenizer``, ``text_encoder_2``, ``tokenizer_2``, ``transformer``.
    """
    return _build_components(
        seed,
        dtype,
        transformer=TINY_TRANSFORMER_CONFIG,
        vae={
            "block_out_channels": (8, 8, 16, 16),
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 32,
        },
        clip={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
        t5={"d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8},
    )


# The mid-size model: structurally faithful, small enough for a 2-core CPU benchmark.
MID_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 384,
    "out_channels": 64,
    "num_layers": 4,
    "num_single_layers": 8,
    "attention_head_dim": 64,
    "num_attention_heads": 8,
    "joint_attention_dim": 256,
    "pooled_projection_dim": 128,
    "guidance_embeds": True,
    "axes_dims_rope": (8, 28, 28),  # the real 16/56/56 split, halved for head dim 64
}
MID_MAX_SEQUENCE_LENGTH = 128  # T5 tokens of the mid model's prompts (the real model uses 512)


def mid_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A mid-size random FLUX Fill model, for CPU benchmarks: the real structure at 1/6 of its width.

    Transformer: 4 double + 8 single stream blocks, 8 heads x 64 (width 512), 384 input / 64 output
    channels, guidance embedding, RoPE axes 8/28/28. At 256x256 pixels it sees 256 image tokens and,
    with ``max_sequence_length=128`` (:data:`MID_MAX_SEQUENCE_LENGTH`), 128 text tokens. Text encoders:
    CLIP (4 layers, width 128) and T5 (4 layers, width 256, gated-GELU). VAE: the real layout (four
    blocks of two ResNet layers, mid-block attention, 16 latent channels, scale factor 8) at
    channels 32/64/128/128. Same keys as :func:`tiny_components`.
    """
    return _build_components(
        seed,
        dtype,
        transformer=MID_TRANSFORMER_CONFIG,
        vae={
            "block_out_channels": (32, 64, 128, 128),
            "layers_per_block": 2,
            "act_fn": "silu",
            "norm_num_groups": 32,
            "sample_size": 256,
            "mid_block_add_attention": True,
        },
        clip={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
        t5={
            "d_kv": 64,
            "d_ff": 640,
            "num_layers": 4,
            "num_heads": 4,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
        },
    )


def save_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder (``model_index.json`` and one folder per component)."""
    from ..pipeline import FluxFillPipeline

    path = Path(path)
    FluxFillPipeline(**tiny_components(seed)).save_pretrained(path)
    return path
