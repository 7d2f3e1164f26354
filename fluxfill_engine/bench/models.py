"""Models, work counts and device peaks for ``fluxfill bench``.

- :func:`transformer_flops`: the FLOPs of one transformer forward (one sampling step), from the shapes.
- :data:`MODEL_PRESETS`: the benchmark models: ``cpu-tiny`` (the test model), ``cpu-mid`` (structurally
  faithful, 2-core-CPU sized) and ``gpu-full`` (the real FLUX.1 Fill [dev] architecture with random
  weights created directly on the GPU).
- :func:`random_components`: build the seven pipeline components from configs with no CPU
  initialisation: parameters are created on the meta device, materialised on the target device in the
  target dtype and filled there with a variance-preserving normal, so activations stay finite.
- :func:`shared_clone`: a second module whose parameters share storage with the first (no copy), for
  variants that change their module in place (hooks, compile, quantization, QKV fusion).
- :func:`device_peak`: the dense tensor-core peak of the device, per precision, with its source.
- :class:`StepInputs`: one transformer step's random inputs (no text encoder, no VAE), for the
  step-level benchmarks (the GPU run, the context-parallel benchmark).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
from ..testing.tiny import (
    MID_MAX_SEQUENCE_LENGTH,
    TINY_VOCAB_WORDS,
    mid_components,
    tiny_components,
    tokenizer_from_vocab,
)

# ---- work per step ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one transformer forward (2 per multiply-add), split by where they are spent.

    ``blocks`` is the 19 + 38 blocks' ``24 d^2 N + 4 N^2 d`` each (``attention`` is the ``4 N^2 d``
    part of it); ``embeddings`` the input/text/time embedders, the per-block modulation (AdaLN) and the
    output layer. Counted as the model defines them (the 384-channel input projection every step), so
    every variant is credited with the same work per step.
    """

    blocks: float
    attention: float
    embeddings: float
    image_tokens: int
    text_tokens: int
    batch: int

    @property
    def total(self) -> float:
        return self.blocks + self.embeddings

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "blocks": self.blocks,
            "attention": self.attention,
            "embeddings": self.embeddings,
            "image_tokens": self.image_tokens,
            "text_tokens": self.text_tokens,
            "batch": self.batch,
            "formula": "blocks x (24 d^2 N + 4 N^2 d) + embeddings, N = image + text tokens",
        }


def image_tokens_for(width: int, height: int, vae_scale_factor: int = 8) -> int:
    """Image tokens of a ``width x height`` request: one per 2x2 patch of latents (``H*W/256``)."""
    multiple = 2 * vae_scale_factor
    return (height // multiple) * (width // multiple)


def transformer_flops(
    config: Mapping[str, Any], image_tokens: int, text_tokens: int, batch: int = 1
) -> FlopCount:
    """FLOPs of one forward of a FLUX transformer with ``config`` (diffusers constructor arguments).

    Per block (double- and single-stream alike), with width ``d`` and ``N`` joint tokens: QKV ``3d^2``,
    attention output ``d^2`` and MLP ``8d^2`` multiply-adds per token (a single-stream block's fused
    ``[attn, mlp]`` output projection is ``5d^2``, its MLP input ``4d^2``: the same ``12 d^2``), so
    ``24 d^2 N`` FLOPs; ``Q K^T`` and ``P V`` add ``4 N^2 d``. At 1024x1024 (N = 4096 + 512, d = 3072)
    that is 74.4 TFLOP for the 57 blocks.
    """
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    double, single = int(config["num_layers"]), int(config["num_single_layers"])
    n = image_tokens + text_tokens
    per_block_linear = 24 * d * d * n
    per_block_attention = 4 * n * n * d
    blocks = (double + single) * (per_block_linear + per_block_attention)
    attention = (double + single) * per_block_attention
    in_channels = int(config["in_channels"])
    out_channels = int(config.get("out_channels") or in_channels)
    joint = int(config["joint_attention_dim"])
    pooled = int(config["pooled_projection_dim"])
    time_proj = 256  # sinusoidal timestep features fed to the time (and guidance) MLPs
    embedders = 2 if config.get("guidance_embeds") else 1
    embeddings = (
        2 * image_tokens * in_channels * d  # x_embedder
        + 2 * text_tokens * joint * d  # context_embedder
        + embedders * 2 * (time_proj * d + d * d)  # timestep (+ guidance) MLP
        + 2 * (pooled * d + d * d)  # pooled text MLP
        + double * 2 * 2 * d * 6 * d  # AdaLN modulation, two streams
        + single * 2 * d * 3 * d  # AdaLN modulation, one stream
        + 2 * d * 2 * d  # norm_out modulation
        + 2 * image_tokens * d * out_channels  # proj_out
    )
    return FlopCount(
        blocks=float(batch * blocks),
        attention=float(batch * attention),
        embeddings=float(batch * embeddings),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        batch=batch,
    )


# ---- device peaks ----------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets. Matched in this order
# against torch.cuda.get_device_name(); "fp32" is the non-tensor-core rate (torch's default matmul
# precision), "tf32" the tensor-core one.
_NVIDIA_PEAKS: list[tuple[tuple[str, ...], dict[str, float], str]] = [
    (
        ("H100", "PCIE"),
        {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "int8": 1513.0, "tf32": 378.0, "fp32": 51.0},
        "NVIDIA H100 PCIe datasheet, dense",
    ),
    (
        ("H100", "NVL"),
        {"bf16": 835.0, "fp16": 835.0, "fp8": 1671.0, "int8": 1671.0, "tf32": 418.0, "fp32": 60.0},
        "NVIDIA H100 NVL datasheet, dense",
    ),
    (
        ("H100",),
        {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9, "tf32": 494.7, "fp32": 66.9},
        "NVIDIA H100 SXM5 datasheet, dense",
    ),
    (
        ("H200",),
        {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "int8": 1978.9, "tf32": 494.7, "fp32": 66.9},
        "NVIDIA H200 SXM datasheet, dense",
    ),
    (
        ("B200",),
        {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "int8": 4500.0, "tf32": 1100.0, "fp32": 80.0},
        "NVIDIA B200 (HGX) datasheet, dense",
    ),
    (
        ("A100",),
        {"bf16": 312.0, "fp16": 312.0, "int8": 624.0, "tf32": 156.0, "fp32": 19.5},
        "NVIDIA A100 datasheet, dense",
    ),
    (
        ("L40S",),
        {"bf16": 362.05, "fp16": 362.05, "fp8": 733.0, "int8": 733.0, "tf32": 183.0, "fp32": 91.6},
        "NVIDIA L40S datasheet, dense",
    ),
    (
        ("L4",),
        {"bf16": 121.0, "fp16": 121.0, "fp8": 242.5, "int8": 242.5, "tf32": 60.0, "fp32": 30.3},
        "NVIDIA L4 datasheet, dense",
    ),
]


@dataclass(frozen=True)
class DevicePeak:
    """Peak TFLOP/s per precision class (``bf16``, ``fp16``, ``fp8``, ``int8``, ``tf32``, ``fp32``)."""

    device_name: str
    tflops: dict[str, float] = field(default_factory=dict)
    source: str = "unknown device: no peak known (give --peak-tflops)"
    measured_tflops: dict[str, float] = field(default_factory=dict)

    def for_precision(self, precision: str) -> float | None:
        return self.tflops.get(precision)

    def measured_for(self, precision: str) -> float | None:
        return self.measured_tflops.get(precision)

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_name": self.device_name,
            "tflops": dict(self.tflops),
            "source": self.source,
            "measured_tflops": dict(self.measured_tflops),
            "measured_method": "8192^3 matmul on random data, CUDA events, 3 warm-ups, mean of 10"
            if self.measured_tflops
            else None,
        }


def device_peak(
    device: torch.device,
    overrides: Mapping[str, float] | None = None,
    device_name: str | None = None,
    measure: bool = False,
) -> DevicePeak:
    """The datasheet peak of ``device`` (none known for CPUs), with ``overrides`` applied on top;
    with ``measure``, also the measured matmul ceiling (:func:`measure_matmul_tflops`, CUDA only)."""
    name = device_name or device_name_of(device)
    tflops: dict[str, float] = {}
    source = "no datasheet peak known for this device"
    if device.type == "cuda":
        upper = name.upper()
        for keys, peaks, where in _NVIDIA_PEAKS:
            if all(key in upper for key in keys):
                tflops, source = dict(peaks), where
                break
    if overrides:
        tflops.update({k: float(v) for k, v in overrides.items()})
        source = f"{source}; overridden on the command line: {dict(overrides)}"
    measured = measure_matmul_tflops(device) if measure else {}
    return DevicePeak(name, tflops, source, measured)


def device_name_of(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA; the CPU model name otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def measure_matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> dict[str, float]:
    """The device's measured matmul ceiling per precision (CUDA only): a ``size``-cubed product on
    random data, timed with CUDA events after 3 warm-ups (the method of the device notes). ``bf16``
    with ``torch.mm``; ``fp8`` with ``torch._scaled_mm`` (fast accumulation) on fp8 tensor cores (compute
    capability >= 8.9).
    """
    if device.type != "cuda":
        return {}
    from ..quantization import has_fp8_tensor_cores

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=generator)
    products: dict[str, Callable[[], torch.Tensor]] = {"bf16": lambda: torch.mm(a, b)}
    if has_fp8_tensor_cores(device):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)
        # Fast accumulation, as torchao's fp8 inference uses: a ceiling must bound every variant.
        products["fp8"] = lambda: torch._scaled_mm(
            a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True
        )
    measured = {}
    for precision, product in products.items():
        for _ in range(3):
            product()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            product()
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1000 / repeats
        measured[precision] = 2 * size**3 / seconds / 1e12
    return measured


def precision_class(dtype: torch.dtype, quant_mode: str | None = None) -> str:
    """The peak that bounds a variant's matmuls: ``fp8``/``int8`` for W8A8, else the compute dtype.

    Weight-only quantization dequantizes to the compute dtype, so it is bounded by that dtype's peak.
    fp32 counts against the non-tensor-core fp32 rate (torch's default ``highest`` matmul precision).
    """
    if quant_mode in ("fp8", "int8"):
        return quant_mode
    if dtype == torch.float32:
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


# ---- random components with no CPU initialisation --------------------------------------------------


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


def _tie_t5_embeddings(model: Any) -> Any:
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
    _tie_t5_embeddings(text_encoder_2)  # outside init_empty_weights, which re-wraps assigned parameters
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


# ---- weight-sharing clones -------------------------------------------------------------------------


def shared_clone(module: nn.Module) -> nn.Module:
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


# ---- benchmark model presets -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """A benchmark model: how to build it and the request size it is measured at by default."""

    name: str
    description: str
    device_type: str  # "cpu" or "cuda": where it is meant to run
    dtype: torch.dtype
    width: int
    height: int
    max_sequence_length: int
    builder: Callable[[int, torch.device, torch.dtype], dict[str, Any]]

    def build(self, seed: int, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
        return self.builder(seed, device, dtype or self.dtype)


def _cpu_builder(
    factory: Callable[..., dict[str, Any]],
) -> Callable[[int, torch.device, torch.dtype], dict[str, Any]]:
    def build(seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        components = factory(seed, dtype=dtype)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            components[name].to(device)
        return components

    return build


def _full_builder(seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return random_components(full_configs(), device=device, dtype=dtype, seed=seed)


MODEL_PRESETS: dict[str, ModelPreset] = {
    "cpu-tiny": ModelPreset(
        name="cpu-tiny",
        description="the test-size model (2 + 2 blocks, 2 heads x 16): a smoke run, seconds",
        device_type="cpu",
        dtype=torch.float32,
        width=64,
        height=64,
        max_sequence_length=32,
        builder=_cpu_builder(tiny_components),
    ),
    "cpu-mid": ModelPreset(
        name="cpu-mid",
        description=(
            "structurally faithful mid-size model (4 double + 8 single blocks, 8 heads x 64, "
            "256 image + 128 text tokens at 256x256) for 2 CPU cores"
        ),
        device_type="cpu",
        dtype=torch.float32,
        width=256,
        height=256,
        max_sequence_length=MID_MAX_SEQUENCE_LENGTH,
        builder=_cpu_builder(mid_components),
    ),
    "gpu-full": ModelPreset(
        name="gpu-full",
        description=(
            "the real FLUX.1 Fill [dev] architecture (19 + 38 blocks, 24 heads x 128, T5-XXL, CLIP-L, "
            "16-channel VAE) with random weights created on the GPU, 1024x1024"
        ),
        device_type="cuda",
        dtype=torch.bfloat16,
        width=int(PIPELINE_DEFAULTS["width"]),
        height=int(PIPELINE_DEFAULTS["height"]),
        max_sequence_length=int(PIPELINE_DEFAULTS["max_sequence_length"]),
        builder=_full_builder,
    ),
}


def parameter_counts(configs: ComponentConfigs) -> dict[str, int]:
    """Parameter counts that decide what each benchmark variant adds to memory (meta device, free).

    ``transformer``: all; ``fused``: the layers the engine fuses into new tensors (QKV of both streams,
    single-block QKV + MLP input); ``block_linears``: the linear layers inside the blocks (what the
    engine quantizes); ``linears``: every linear layer (what torchao's ``quantize_`` converts);
    ``t5_linears``: T5's linear layers but ``wo`` (what ``quantize_text_encoder`` converts); plus
    ``vae``, ``text_encoder``, ``text_encoder_2``.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def count(modules: Any) -> int:
        return sum(p.numel() for m in modules for p in m.parameters())

    with init_empty_weights(include_buffers=False):
        transformer = FluxTransformer2DModel(**configs.transformer)
        vae = AutoencoderKL(**configs.vae)
        clip = CLIPTextModel(CLIPTextConfig(**configs.clip))
        t5 = T5EncoderModel(T5Config(**configs.t5))
    _tie_t5_embeddings(t5)
    fused = []
    for block in transformer.transformer_blocks:
        attn = block.attn
        fused += [attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]
    for block in transformer.single_transformer_blocks:
        fused += [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    return {
        "transformer": count([transformer]),
        "fused": count(fused),
        "block_linears": count(m for b in blocks for m in b.modules() if isinstance(m, nn.Linear)),
        "linears": count(m for m in transformer.modules() if isinstance(m, nn.Linear)),
        "t5_linears": count(
            m for name, m in t5.named_modules() if isinstance(m, nn.Linear) and not name.endswith("wo")
        ),
        "vae": count([vae]),
        "text_encoder": count([clip]),
        "text_encoder_2": count([t5]),
    }


def engine_pipeline(transformer: Any) -> Any:
    """The drop-in pipeline around a transformer alone: a step needs no text encoder or VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..architecture import SCHEDULER_CONFIG
    from ..pipeline import FluxFillPipeline

    return FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def flux_ids(
    text_tokens: int, grid: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's position ids: text all zeros, image ``(0, row, col)`` over the patch grid."""
    rows, cols = grid
    img_ids = torch.zeros(rows, cols, 3, device=device)
    img_ids[..., 1] = torch.arange(rows, device=device)[:, None]
    img_ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return torch.zeros(text_tokens, 3, device=device), img_ids.reshape(rows * cols, 3)


@dataclass
class StepInputs:
    """One request's transformer inputs for ``steps`` steps, random from a fixed seed and made on the
    device: packed latents, the condition (latents and a random mask), prompt embeddings (no text
    encoder), ids and the timesteps."""

    latents: torch.Tensor
    cond: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    timesteps: torch.Tensor  # sigma * 1000, float32, one per step (the engine's prepare)

    @classmethod
    def random(
        cls,
        config: Mapping[str, Any],
        width: int,
        height: int,
        text_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        steps: int = 1,
    ) -> StepInputs:
        rows, cols = height // 16, width // 16
        tokens = rows * cols
        generator = torch.Generator(device=device).manual_seed(5)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, generator=generator).to(dtype)

        noise = int(config.get("out_channels") or 64)
        mask_channels = int(config["in_channels"]) - 2 * noise
        cond_latents = randn(1, tokens, noise)
        mask = torch.rand(1, tokens, mask_channels, device=device, generator=generator) > 0.5
        txt_ids, img_ids = flux_ids(text_tokens, (rows, cols), device)
        return cls(
            latents=randn(1, tokens, noise),
            cond=torch.cat([cond_latents, mask.to(dtype)], dim=2),
            prompt_embeds=randn(1, text_tokens, int(config["joint_attention_dim"])),
            pooled=randn(1, int(config["pooled_projection_dim"])),
            txt_ids=txt_ids,
            img_ids=img_ids,
            timesteps=torch.linspace(750.0, 750.0 / steps, steps, device=device),
        )

    def batched(self, size: int) -> StepInputs:
        """The same inputs for ``size`` requests at once, as the server's batches run them: every
        per-request tensor repeated along the batch dimension (the ids are shared)."""
        return dataclasses.replace(
            self,
            latents=self.latents.repeat(size, 1, 1),
            cond=self.cond.repeat(size, 1, 1),
            prompt_embeds=self.prompt_embeds.repeat(size, 1, 1),
            pooled=self.pooled.repeat(size, 1),
        )

    def prepare(self, fill: Any, guidance: float) -> Any:
        """The engine transformer's per-request precompute (``FillTransformer.prepare``) for these."""
        return fill.prepare(
            self.cond,
            self.prompt_embeds,
            self.pooled,
            self.timesteps,
            guidance,
            self.txt_ids,
            self.img_ids,
            self.latents.dtype,
        )

    def diffusers_kwargs(self, guidance: float, step: int = 0) -> dict[str, Any]:
        """diffusers' FluxFillPipeline call of its transformer: the timestep rounded through the latents'
        dtype and divided by 1000, guidance as float32."""
        dtype = self.latents.dtype
        return {
            "hidden_states": torch.cat((self.latents, self.cond), dim=2),
            "timestep": self.timesteps[step : step + 1].to(dtype) / 1000,
            "guidance": torch.full([1], guidance, device=self.latents.device, dtype=torch.float32),
            "pooled_projections": self.pooled,
            "encoder_hidden_states": self.prompt_embeds,
            "txt_ids": self.txt_ids,
            "img_ids": self.img_ids,
            "return_dict": False,
        }
