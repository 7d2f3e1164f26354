"""Memory plans: how much device memory a configuration needs, and the fastest plan that fits a budget.

A plan sets the placement fields of :class:`~.config.EngineConfig` (``quantize_text_encoder``,
``cpu_offload``, ``text_encoders_on_cpu``, ``block_streaming``; see :mod:`.offload`). :data:`PLANS`
lists them fastest first; :func:`choose_memory_plan` returns the first whose estimate fits.

The estimate (:func:`estimate_memory`) is computed on the meta device at the model's real size (by
default the FLUX.1 Fill [dev] architecture, :mod:`.architecture`), with no weights loaded:

- weights: each component built on the meta device, its parameter bytes in the run's dtype, the
  transformer blocks' linears at one byte per weight plus fp32 row scales when quantized (T5's too,
  but ``wo``, with ``quantize_text_encoder``), as :mod:`.quantization` stores them;
- activations: one transformer step (with the per-request inputs), the VAE's encoder and decoder and
  the text encoders run on meta tensors at the requested size, the live bytes of every tensor created
  tracked op by op (:class:`LiveBytes`); attention counts flash attention's output and log-sum-exp
  (what SDPA's flash and memory-efficient kernels allocate on CUDA), not the quadratic score matrix of
  the math path;
- stages: the peak of text encoding, VAE encoding, denoising and decoding, each with the weights the
  plan holds on the device then, plus :data:`CUDA_OVERHEAD_BYTES` for the CUDA context, library
  workspaces and allocator slack (a guess until the GPU run measures it).

The speed order of :data:`PLANS` is by design (bytes moved per request), not measured on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .architecture import CLIP_TEXT_CONFIG, PIPELINE_DEFAULTS, T5_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG
from .config import EngineConfig, parse_dtype

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from .model import FillTransformer

GIB = 1024**3
# CUDA context, cuBLAS/cuDNN workspaces and caching-allocator slack: a guess until measured on a GPU.
CUDA_OVERHEAD_BYTES = GIB
_QUANT_SCALE_BYTES = 4  # one fp32 scale per output row


@dataclass(frozen=True)
class MemoryPlan:
    """One placement of the components: its name, what it does, and the config fields it sets."""

    name: str
    description: str
    quantize_text_encoder: bool = False
    cpu_offload: bool = False
    text_encoders_on_cpu: bool = False
    block_streaming: bool = False

    def fields(self) -> dict[str, bool]:
        """The :class:`~.config.EngineConfig` fields this plan sets."""
        return {
            "quantize_text_encoder": self.quantize_text_encoder,
            "cpu_offload": self.cpu_offload,
            "text_encoders_on_cpu": self.text_encoders_on_cpu,
            "block_streaming": self.block_streaming,
        }

    def apply(self, config: EngineConfig) -> EngineConfig:
        """``config`` with this plan's fields, quantizing in host memory (``quantize_on_cpu``: the
        device never holds the bf16 weights); block streaming runs the blocks eagerly and reads them
        one at a time (``compile`` and ``precompute_modulation`` off)."""
        extra = {"compile": False, "precompute_modulation": False} if self.block_streaming else {}
        return dataclasses.replace(config, **self.fields(), quantize_on_cpu=True, **extra)


# Fastest first. Resident plans move nothing; offload moves T5 (quantized: ~6 GB on the real model)
# to the device for each new prompt and the VAE's halves for each request; T5 on the CPU is slow for a
# new prompt (seconds); streaming copies every block's weights to the device every step.
PLANS: tuple[MemoryPlan, ...] = (
    MemoryPlan("resident", "every component on the device"),
    MemoryPlan("resident-t5-quantized", "every component on the device, T5 quantized", True),
    MemoryPlan(
        "offload-encoders-vae",
        "transformer on the device; T5 (quantized), CLIP and the VAE copied to the device while they run",
        True,
        cpu_offload=True,
    ),
    MemoryPlan(
        "text-encoders-on-cpu",
        "transformer on the device; CLIP and T5 run on the CPU; the VAE copied to the device while it runs",
        cpu_offload=True,
        text_encoders_on_cpu=True,
    ),
    MemoryPlan(
        "block-streaming",
        "transformer blocks streamed from pinned host memory; T5 (quantized), CLIP and the VAE offloaded",
        True,
        cpu_offload=True,
        block_streaming=True,
    ),
    MemoryPlan(
        "block-streaming-text-on-cpu",
        "transformer blocks streamed from pinned host memory; text encoders on the CPU; the VAE offloaded",
        cpu_offload=True,
        text_encoders_on_cpu=True,
        block_streaming=True,
    ),
)
PLANS_BY_NAME = {plan.name: plan for plan in PLANS}


def plan_of(config: EngineConfig) -> MemoryPlan:
    """The plan ``config``'s placement fields describe (a custom one when no named plan matches)."""
    wanted = {name: getattr(config, name) for name in PLANS[0].fields()}
    for plan in PLANS:
        if plan.fields() == wanted:
            return plan
    return MemoryPlan("custom", "placement fields set by hand", **wanted)


# ---- sizes ---------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory_size(text: str | int, name: str = "--max-vram") -> int:
    """Bytes from ``"16GB"``, ``"24 GiB"``, ``"800MB"`` or a plain number of bytes. GPU makers' "16 GB"
    cards hold 16 GiB, so ``GB`` is read as GiB (``10**9`` would promise 7% less than the card has);
    ``GiB``/``MiB`` are binary, ``MB``/``kB`` decimal."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if match is None:
            raise ValueError(f"`{name}` must be a size such as 16GB, 24GiB or 800MB, got {text!r}")
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit == "gb":
        unit = "gib"
    if unit not in _UNITS:
        raise ValueError(f"`{name}`: unknown unit {unit!r} in {text!r}; use GB, GiB, MB, MiB or bytes")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"`{name}` must be more than 0 bytes, got {text!r}")
    return size


def format_gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


# ---- live bytes on the meta device ----------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors created under it that are still alive, and their peak.

    A storage counts from the op that allocated it (an output that aliases no input) until the last
    tensor viewing it dies; views made under the mode keep it alive. Tensors created before the mode
    (weights, inputs) are not counted. Works on any device; on ``meta`` nothing is computed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [tensors alive, bytes]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for index, tensor in enumerate(flat):
            if not isinstance(tensor, torch.Tensor):
                continue
            schema = returns[0] if len(returns) == 1 else returns[min(index, len(returns) - 1)]
            storage = tensor.untyped_storage()
            key = storage._cdata
            entry = self._storages.get(key)
            if entry is None:
                if schema.alias_info is not None:  # a view or in-place result of an untracked tensor
                    continue
                entry = self._storages[key] = [0, storage.nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live -= entry[1]


class FlashLikeAttention(TorchFunctionMode):
    """SDPA that allocates what CUDA's flash / memory-efficient kernels do (the output and a float32
    log-sum-exp per query) instead of the math path's score matrix; no values are computed."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, value = args[0], args[2]
            out = query.new_empty((*query.shape[:-1], value.shape[-1]))
            logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
            del logsumexp  # freed when the kernel returns
            return out
        return func(*args, **kwargs)


def peak_bytes_of(run: Callable[[], Any]) -> int:
    """The peak live bytes of the tensors ``run`` creates (meta inputs: nothing computed)."""
    tracker = LiveBytes()
    with FlashLikeAttention(), tracker, torch.no_grad():
        result = run()
        del result
    return tracker.peak


# ---- the model's configs ---------------------------------------------------------------------------


def _frozen(config: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")},
        sort_keys=True,
        default=str,
    )


@dataclass(frozen=True)
class ModelConfigs:
    """The component configs an estimate is made for (JSON text, so estimates can be cached)."""

    transformer: str
    t5: str
    clip: str
    vae: str

    @classmethod
    def real(cls) -> ModelConfigs:
        """FLUX.1 Fill [dev]."""
        return cls(
            _frozen(TRANSFORMER_CONFIG), _frozen(T5_CONFIG), _frozen(CLIP_TEXT_CONFIG), _frozen(VAE_CONFIG)
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfigs:
        """A diffusers FLUX.1 Fill folder's component configs (``<component>/config.json``), read
        without loading any weights."""
        parts = {}
        for field, component in (
            ("transformer", "transformer"),
            ("t5", "text_encoder_2"),
            ("clip", "text_encoder"),
            ("vae", "vae"),
        ):
            path = Path(folder) / component / "config.json"
            if not path.is_file():
                raise ValueError(
                    f"no {component}/config.json in {str(folder)!r}: not a diffusers FLUX.1 Fill folder"
                )
            parts[field] = _frozen(json.loads(path.read_text()))
        return cls(**parts)

    @classmethod
    def of_pipeline(cls, pipe: Any) -> ModelConfigs:
        """A loaded pipeline's components (a tiny test model gets a tiny estimate)."""
        return cls.of_components(pipe.components)

    @classmethod
    def of_components(cls, components: Mapping[str, Any]) -> ModelConfigs:
        """Pipeline components by name (``transformer``, ``text_encoder_2``, ``text_encoder``, ``vae``)."""
        return cls(
            _frozen(dict(components["transformer"].config)),
            _frozen(components["text_encoder_2"].config.to_dict()),
            _frozen(components["text_encoder"].config.to_dict()),
            _frozen(dict(components["vae"].config)),
        )


def _meta_transformer(config: str) -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(json.loads(config))
    return cast("FluxTransformer2DModel", model).eval()


def _meta_t5(config: str) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    fields = json.loads(config)
    with torch.device("meta"):
        return T5EncoderModel(T5Config(**fields)).eval()


def _meta_clip(config: str) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**json.loads(config))).eval()


def _meta_vae(config: str) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL.from_config(json.loads(config))
    return cast("AutoencoderKL", model).eval()


def _never(name: str) -> bool:
    return False


def _param_bytes(module: nn.Module, dtype_bytes: int, quantized: Callable[[str], bool] = _never) -> int:
    """Bytes of ``module``'s parameters in the run's dtype; the linears whose name ``quantized``
    selects count one byte per weight plus fp32 row scales (their bias stays in the dtype)."""
    total, seen = 0, set()
    for name, layer in module.named_modules():
        for param_name, param in layer.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(layer, nn.Linear) and param_name == "weight" and quantized(name):
                total += param.numel() + layer.out_features * _QUANT_SCALE_BYTES
            else:
                total += param.numel() * dtype_bytes
    return total


@dataclass(frozen=True)
class WeightBytes:
    """Device bytes of each part's weights in the run's dtype and quantization."""

    transformer_blocks: int
    transformer_two_largest_blocks: int
    transformer_outer: int
    t5: int
    clip: int
    vae_encoder: int
    vae_decoder: int

    @property
    def transformer(self) -> int:
        return self.transformer_blocks + self.transformer_outer


@functools.lru_cache(maxsize=32)
def weight_bytes(configs: ModelConfigs, dtype_bytes: int, quant: bool, t5_quant: bool) -> WeightBytes:
    """The weight bytes of each part, counted on the meta device."""
    transformer = _meta_transformer(configs.transformer)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    per_block = [_param_bytes(block, dtype_bytes, lambda name: quant) for block in blocks]
    plain_blocks = sum(_param_bytes(block, dtype_bytes) for block in blocks)
    two = max(a + b for a, b in zip(per_block, per_block[1:] + per_block[:1], strict=True))
    # T5's feed-forward output `wo` stays unquantized (quantization.quantize_text_encoder's skip)
    t5 = _param_bytes(
        _meta_t5(configs.t5), dtype_bytes, lambda name: t5_quant and name.split(".")[-1] != "wo"
    )
    vae = _meta_vae(configs.vae)
    encoder = _param_bytes(vae.encoder, dtype_bytes)
    return WeightBytes(
        transformer_blocks=sum(per_block),
        transformer_two_largest_blocks=two,
        transformer_outer=_param_bytes(transformer, dtype_bytes) - plain_blocks,
        t5=t5,
        clip=_param_bytes(_meta_clip(configs.clip), dtype_bytes),
        vae_encoder=encoder,
        vae_decoder=_param_bytes(vae, dtype_bytes) - encoder,
    )


@dataclass(frozen=True)
class ActivationBytes:
    """Peak bytes of the temporaries of each stage (inputs they receive included)."""

    text_encode: int
    vae_encode: int
    denoise: int
    decode: int


def meta_step_bytes(
    configs: ModelConfigs, dtype: torch.dtype, quant: str, batch: int, grid: tuple[int, int]
) -> int:
    """:func:`step_bytes` of the engine transformer built on the meta device from ``configs``
    (quantized as ``quant``), for ``grid`` = (latent rows, latent columns) / 2 image tokens."""
    from .model import FillTransformer
    from .quantization import QuantPlan

    transformer = _meta_transformer(configs.transformer)
    nn.Module.to(transformer, dtype)  # diffusers' own .to warns about float32 modules
    fill = FillTransformer.from_diffusers(transformer)
    if quant != "none":
        fill.quantize(QuantPlan(quant, "native", "memory estimate"))
    tokens = grid[0] * grid[1]
    return step_bytes(fill, json.loads(configs.transformer), dtype, batch, tokens, torch.device("meta"))


def step_bytes(
    fill: FillTransformer,
    config: Mapping[str, Any],
    dtype: torch.dtype,
    batch: int,
    tokens: int,
    device: torch.device,
) -> int:
    """Peak live bytes of one request's ``prepare`` and first step of the engine transformer ``fill``
    (``config``: its diffusers config) for ``batch`` images of ``tokens`` image tokens, the inputs made
    inside; on ``meta`` nothing is computed (a real device runs the same ops: the tests compare)."""
    text_len = int(PIPELINE_DEFAULTS["max_sequence_length"])
    noise = config.get("out_channels") or 64
    steps = int(PIPELINE_DEFAULTS["num_inference_steps"])

    def step() -> Any:
        latents = torch.zeros(batch, tokens, noise, device=device, dtype=dtype)
        cond = torch.zeros(batch, tokens, config["in_channels"] - noise, device=device, dtype=dtype)
        prompt = torch.zeros(batch, text_len, config["joint_attention_dim"], device=device, dtype=dtype)
        pooled = torch.zeros(batch, config["pooled_projection_dim"], device=device, dtype=dtype)
        timesteps = torch.linspace(1000, 1, steps, device=device)
        txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)
        img_ids = torch.zeros(tokens, 3, device=device, dtype=dtype)
        guidance = 30.0 if config.get("guidance_embeds") else None
        inputs = fill.prepare(cond, prompt, pooled, timesteps, guidance, txt_ids, img_ids, dtype)
        return latents, inputs, fill(latents, 0, inputs)

    return peak_bytes_of(step)


def _quant_modes(quant: str) -> list[str]:
    # "fp8" runs W8A8 with fp8 tensor cores and int8 weight-only without: count the larger.
    return {"none": ["none"], "fp8": ["fp8", "int8-weight"]}.get(quant, [quant])


@functools.lru_cache(maxsize=32)
def activation_bytes(
    configs: ModelConfigs, dtype_name: str, quant: str, batch: int, width: int, height: int
) -> ActivationBytes:
    """Peak temporaries of each stage at ``width`` x ``height``, measured on the meta device."""
    dtype = getattr(torch, dtype_name)
    meta = torch.device("meta")
    vae_config = json.loads(configs.vae)
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    latent_h, latent_w = height // scale, width // scale
    denoise = max(
        meta_step_bytes(configs, dtype, mode, batch, (latent_h // 2, latent_w // 2))
        for mode in _quant_modes(quant)
    )
    vae = _meta_vae(configs.vae)
    nn.Module.to(vae, dtype)

    def encode() -> Any:
        image = torch.empty(batch, vae_config["in_channels"], height, width, device=meta, dtype=dtype)
        return vae.encoder(image)  # pyright: ignore[reportCallIssue]

    def decode() -> Any:
        latents = torch.empty(
            batch, vae_config["latent_channels"], latent_h, latent_w, device=meta, dtype=dtype
        )
        return vae.decoder(latents)  # pyright: ignore[reportCallIssue]

    return ActivationBytes(
        text_encode=_text_bytes(configs, dtype, batch),
        vae_encode=peak_bytes_of(encode),
        denoise=denoise,
        decode=peak_bytes_of(decode),
    )


def _text_bytes(configs: ModelConfigs, dtype: torch.dtype, batch: int) -> int:
    meta = torch.device("meta")
    t5, clip = _meta_t5(configs.t5).to(dtype), _meta_clip(configs.clip).to(dtype)
    text_len = int(PIPELINE_DEFAULTS["max_sequence_length"])
    clip_len = int(json.loads(configs.clip).get("max_position_embeddings", 77))
    t5_peak = peak_bytes_of(lambda: t5(torch.zeros(batch, text_len, dtype=torch.long, device=meta)))
    clip_peak = peak_bytes_of(lambda: clip(torch.zeros(batch, clip_len, dtype=torch.long, device=meta)))
    return max(t5_peak, clip_peak)


# ---- the estimate and the chooser --------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """A plan's device-memory estimate at one size: the peak, and each stage's."""

    plan: str
    width: int
    height: int
    batch: int
    peak_bytes: int
    stages: dict[str, int]
    resident_weight_bytes: int

    def describe(self) -> dict[str, Any]:
        """Plain numbers (bytes) and the same in GiB, for ``describe()`` and the GPU run's comparison."""
        return {
            "plan": self.plan,
            "size": f"{self.width}x{self.height}",
            "batch": self.batch,
            "peak_bytes": self.peak_bytes,
            "peak": format_gib(self.peak_bytes),
            "resident_weight_bytes": self.resident_weight_bytes,
            "stage_bytes": dict(self.stages),
            "overhead_bytes": CUDA_OVERHEAD_BYTES,
        }


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    parsed = parse_dtype(dtype) or torch.bfloat16
    return str(parsed).replace("torch.", "")


def estimate_memory(
    plan: MemoryPlan | str,
    width: int = 1024,
    height: int = 1024,
    quant: str = "none",
    dtype: str | torch.dtype | None = "bfloat16",
    batch: int = 1,
    configs: ModelConfigs | None = None,
) -> MemoryEstimate:
    """Peak device bytes of one request at ``width`` x ``height`` (``batch`` images) under ``plan``,
    for the transformer quantized as ``quant`` (``EngineConfig.quant``) in ``dtype``; ``configs``:
    the model (default: FLUX.1 Fill [dev]). See the module docstring for what is counted."""
    if isinstance(plan, str):
        if plan not in PLANS_BY_NAME:
            raise ValueError(f"unknown memory plan {plan!r}; plans: {list(PLANS_BY_NAME)}")
        plan = PLANS_BY_NAME[plan]
    for name, value in (("width", width), ("height", height), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    configs = configs or ModelConfigs.real()
    dtype_name = _dtype_name(dtype)
    dtype_bytes = getattr(torch, dtype_name).itemsize
    weights = weight_bytes(configs, dtype_bytes, quant != "none", plan.quantize_text_encoder)
    acts = activation_bytes(configs, dtype_name, quant, batch, width, height)
    transformer = (
        weights.transformer_outer + weights.transformer_two_largest_blocks
        if plan.block_streaming
        else weights.transformer
    )
    encoders_on_device = not (plan.cpu_offload or plan.text_encoders_on_cpu)
    encoders = weights.t5 + weights.clip if encoders_on_device else 0
    vae = 0 if plan.cpu_offload else weights.vae_encoder + weights.vae_decoder
    resident = transformer + encoders + vae
    text_weights = 0 if encoders_on_device or plan.text_encoders_on_cpu else max(weights.t5, weights.clip)
    text_acts = 0 if plan.text_encoders_on_cpu else acts.text_encode
    stages = {
        "text_encode": resident + text_weights + text_acts,
        "vae_encode": resident + (weights.vae_encoder if plan.cpu_offload else 0) + acts.vae_encode,
        "denoise": resident + acts.denoise,
        "decode": resident + (weights.vae_decoder if plan.cpu_offload else 0) + acts.decode,
    }
    stages = {name: value + CUDA_OVERHEAD_BYTES for name, value in stages.items()}
    return MemoryEstimate(plan.name, width, height, batch, max(stages.values()), stages, resident)


def estimate_config(
    config: EngineConfig,
    width: int = 1024,
    height: int = 1024,
    batch: int = 1,
    configs: ModelConfigs | None = None,
) -> MemoryEstimate:
    """:func:`estimate_memory` for an engine configuration's plan, quantization and dtype."""
    return estimate_memory(plan_of(config), width, height, config.quant, config.dtype, batch, configs)


def choose_memory_plan(
    budget_bytes: int,
    width: int = 1024,
    height: int = 1024,
    quant: str = "none",
    dtype: str | torch.dtype | None = "bfloat16",
    batch: int = 1,
    configs: ModelConfigs | None = None,
    plans: tuple[MemoryPlan, ...] = PLANS,
) -> tuple[MemoryPlan, MemoryEstimate]:
    """The fastest of ``plans`` (listed fastest first) whose estimate fits ``budget_bytes``, with the
    estimate. ``ValueError`` when none fits, naming what the smallest plan needs."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"`budget_bytes` must be a positive int, got {budget_bytes!r}")
    estimates = []
    for plan in plans:
        estimate = estimate_memory(plan, width, height, quant, dtype, batch, configs)
        if estimate.peak_bytes <= budget_bytes:
            return plan, estimate
        estimates.append(estimate)
    smallest = min(estimates, key=lambda e: e.peak_bytes)
    raise ValueError(
        f"no memory plan fits {format_gib(budget_bytes)} at {width}x{height} "
        f"(batch {batch}, quant={quant!r}): "
        f"the smallest, {smallest.plan!r}, needs about {format_gib(smallest.peak_bytes)} "
        f"({smallest.peak_bytes} bytes); give more memory, a smaller size or a quantized transformer "
        "(quant='fp8': --preset fast)"
    )


def plan_table(
    budgets_gib: tuple[int, ...] = (80, 48, 24, 16, 12),
    width: int = 1024,
    height: int = 1024,
    quant: str = "fp8",
) -> list[tuple[int, str, str]]:
    """``(card GiB, plan, expected peak)`` rows for the README (real architecture)."""
    rows = []
    for budget in budgets_gib:
        try:
            plan, estimate = choose_memory_plan(budget * GIB, width, height, quant)
        except ValueError:
            rows.append((budget, "none fits", "-"))
            continue
        rows.append((budget, plan.name, format_gib(estimate.peak_bytes)))
    return rows
