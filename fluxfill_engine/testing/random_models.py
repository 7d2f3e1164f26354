"""FLUX Fill components with random weights, built from configs with no CPU initialisation, and
weight-sharing clones.

- :func:`random_components`: the seven pipeline components; parameters are created on the meta device,
  materialised on the target device in the target dtype and filled there with a variance-preserving
  normal, so activations stay finite. The benchmark's ``gpu-full`` model (the real FLUX.1 Fill [dev]
  architecture) is built this way in seconds, with no 48 GB CPU allocation.
- :func:`random_transformer`: the transformer alone, the same way.
- :func:`full_configs` (the real architecture) and :func:`reduced_configs` (the same classes at toy
  widths, to run the real path on a CPU).
- :func:`shared_clone`: a second module whose parameters share storage with the first (no copy), for
  benchmark variants that change their module in place (hooks, compile, quantization, QKV fusion).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from ..architecture import (
    CLIP_TEXT_CONFIG,
    PIPELINE_DEFAULTS,
    SCHEDULER_CONFIG,
    T5_CONFIG,
    TRANSFORMER_CONFIG,
    VAE_CONFIG,
)
from .tiny import TINY_VOCAB_WORDS, tokenizer_from_vocab

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class ComponentConfigs:
    """Constructor arguments of the four models plus the tokenizers' vocabulary sizes."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip: dict[str, Any]
    t5: dict[str, Any]
    clip_vocab_size: int
    t5_vocab_size: int
    clip_max_length: int = 77
    t5_max_length: int = 512


def full_configs() -> ComponentConfigs:
    """The real FLUX.1 Fill [dev]: 11.9B transformer, T5-XXL (4.76B), CLIP-L (123M), the 16-ch VAE.

    Tokenizer vocabularies have the real sizes (CLIP 49408, T5 32100 pieces; T5's embedding has 32128
    rows): ids only matter for shapes, so the tokenizers are word-level ones built in memory.
    """
    return ComponentConfigs(
        transformer=dict(TRANSFORMER_CONFIG),
        vae=dict(VAE_CONFIG),
        clip=dict(CLIP_TEXT_CONFIG),
        t5=dict(T5_CONFIG),
        clip_vocab_size=int(CLIP_TEXT_CONFIG["vocab_size"]),
        t5_vocab_size=32100,
        clip_max_length=int(PIPELINE_DEFAULTS["clip_max_length"]),
        t5_max_length=int(PIPELINE_DEFAULTS["max_sequence_length"]),
    )


def reduced_configs() -> ComponentConfigs:
    """The real component classes and code path at toy widths (1 + 2 transformer blocks, 2 heads x 32;
    two-layer CLIP and T5; a four-block VAE at 8-32 channels), with the real tokenizer vocabularies."""
    return ComponentConfigs(
        transformer=dict(
            TRANSFORMER_CONFIG,
            num_layers=1,
            num_single_layers=2,
            num_attention_heads=2,
            attention_head_dim=32,
            joint_attention_dim=64,
            pooled_projection_dim=32,
            axes_dims_rope=(8, 12, 12),
        ),
        vae=dict(VAE_CONFIG, block_out_channels=(8, 16, 32, 32), norm_num_groups=8, layers_per_block=1),
        clip=dict(
            CLIP_TEXT_CONFIG,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        t5=dict(T5_CONFIG, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4),
        clip_vocab_size=int(CLIP_TEXT_CONFIG["vocab_size"]),
        t5_vocab_size=32100,
    )


def vocab_tokenizer(
    vocab_size: int,
    model_max_length: int,
    specials: Mapping[str, int],
    pad: str,
    eos: str,
    bos: str | None = None,
    unk: str = "<unk>",
) -> Any:
    """A word-level tokenizer with ``vocab_size`` ids, special tokens at the given ids, built in memory.

    The words of the tiny vocabulary get the first free ids and every other id a placeholder piece, so
    token ids span the real range (what the embedding tables see) and no file is downloaded.
    """
    for token in {pad, eos, unk, *([bos] if bos else [])}:
        if token not in specials:
            raise ValueError(f"special token {token!r} needs an id in `specials`")
    if any(not 0 <= i < vocab_size for i in specials.values()):
        raise ValueError(f"special token ids must be in [0, {vocab_size}), got {dict(specials)}")
    by_id: dict[int, str] = {i: token for token, i in specials.items()}
    words = iter(TINY_VOCAB_WORDS)
    for i in range(vocab_size):
        if i not in by_id:
            by_id[i] = next(words, None) or f"<piece_{i}>"
    vocab = {token: i for i, token in by_id.items()}
    return tokenizer_from_vocab(vocab, model_max_length, pad=pad, eos=eos, bos=bos, unk=unk)


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return max(1, math.prod(weight.shape[1:]))


def _fill_(module: nn.Module, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    """Variance-preserving init: every linear map keeps its input's scale, so activations stay O(1)."""
    if tensor.dim() >= 2:
        std = 1.0 if isinstance(module, nn.Embedding) else _fan_in(module, tensor) ** -0.5
        tensor.normal_(0.0, std, generator=generator)
    elif name == "weight":
        tensor.fill_(1.0)  # norm scales
    else:
        tensor.zero_()  # biases (and any other vector: shifts start at zero)


@torch.no_grad()
def materialize_(
    module: nn.Module, device: torch.device | str, dtype: torch.dtype, generator: torch.Generator
) -> nn.Module:
    """Give every meta parameter of ``module`` real storage on ``device`` in ``dtype``, initialised there.

    Tied parameters stay tied. Buffers (built for real on the CPU: position ids and the like) are moved
    to ``device`` without changing their dtype.
    """
    done: dict[int, nn.Parameter] = {}
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                if param.device.type == "meta":
                    tensor = torch.empty(param.shape, device=device, dtype=dtype)
                    _fill_(submodule, name, tensor, generator)
                else:
                    tensor = param.data.to(device=device, dtype=dtype)
                done[id(param)] = nn.Parameter(tensor, requires_grad=False)
            submodule._parameters[name] = done[id(param)]
    for submodule in module.modules():
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                if buffer.device.type == "meta":
                    raise ValueError(f"buffer {name!r} of {type(submodule).__name__} was built on meta")
                submodule._buffers[name] = buffer.to(device)
    return module.eval()


def tie_t5_embeddings(model: Any) -> Any:
    """One token embedding for ``shared`` and ``encoder.embed_tokens``, as in a loaded T5 checkpoint."""
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(model, "shared") and hasattr(encoder, "embed_tokens"):
        encoder.embed_tokens.weight = model.shared.weight
    return model


def random_components(
    configs: ComponentConfigs,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, Any]:
    """The seven FLUX Fill pipeline components with random weights, created directly on ``device``.

    Nothing is initialised on the CPU: the models are constructed with their parameters on the meta
    device (accelerate's ``init_empty_weights``, buffers real), then :func:`materialize_` allocates each
    parameter on ``device`` in ``dtype`` and fills it there (normal with std ``1/sqrt(fan_in)``, norm
    scales 1, biases 0) from a generator seeded with ``seed``. This is how ``gpu-full`` builds the 12B
    transformer and the T5-XXL encoder in seconds, with no 48 GB CPU allocation.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    clip_specials = {
        "<|endoftext|>": int(configs.clip["eos_token_id"]),
        "<|startoftext|>": int(configs.clip["bos_token_id"]),
        "<unk>": int(configs.clip["eos_token_id"]) - 2,
    }
    # CLIP's tokenizer pads with its end-of-text token, as FLUX's does.
    tokenizer = vocab_tokenizer(
        configs.clip_vocab_size,
        configs.clip_max_length,
        clip_specials,
        pad="<|endoftext|>",
        eos="<|endoftext|>",
        bos="<|startoftext|>",
    )
    tokenizer_2 = vocab_tokenizer(
        configs.t5_vocab_size,
        configs.t5_max_length,
        {"<pad>": 0, "</s>": 1, "<unk>": 2},
        pad="<pad>",
        eos="</s>",
    )
    with init_empty_weights(include_buffers=False):
        transformer = FluxTransformer2DModel(**configs.transformer)
        vae = AutoencoderKL(**configs.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs.clip))
        t5_config = dict(configs.t5)
        t5_config.setdefault("pad_token_id", 0)
        t5_config.setdefault("eos_token_id", 1)
        text_encoder_2 = T5EncoderModel(T5Config(**t5_config))
    tie_t5_embeddings(text_encoder_2)  # outside init_empty_weights, which re-wraps assigned parameters
    for module in (transformer, vae, text_encoder, text_encoder_2):
        materialize_(module, device, dtype, generator)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def random_transformer(
    config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Any:
    """The FLUX transformer alone (default: the real 11.9B config), random, created on ``device``."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    device = torch.device(device)
    with init_empty_weights(include_buffers=False):
        transformer = FluxTransformer2DModel(**dict(config or TRANSFORMER_CONFIG))
    return materialize_(transformer, device, dtype, torch.Generator(device=device).manual_seed(seed))


def shared_clone(module: ModuleT) -> ModuleT:
    """A copy of ``module`` whose parameters are new ``Parameter`` objects sharing the same storage.

    No weight memory is added. Replacing a layer, a parameter or a parameter's ``.data`` in the clone
    (QKV fusion, quantization, ``.to(dtype)``, diffusers hooks, ``compile``) leaves the original as it
    was; writing into the shared storage in place would not. The engine transformer kept on a
    diffusers module is not copied (a copied module builds its own, see :mod:`fluxfill_engine.runtime`).
    """
    memo: dict[int, Any] = {}
    for param in module.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(module, memo)
