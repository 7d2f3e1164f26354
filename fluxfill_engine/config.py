"""Engine configuration: one frozen dataclass, one field per optimization switch, named presets."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# This module imports no torch: `fluxfill --help` and the command-line parsers read it, and must answer
# at once. The choices of each switch are defined here; the modules that implement them import these.
if TYPE_CHECKING:
    import torch

ATTENTION_BACKENDS = ("sdpa", "xformers", "triton", "auto")
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
QUANT_MODES = ("none", "fp8", "fp8-weight", "int8", "int8-weight")
QUANT_BACKENDS = ("auto", "native", "quanto", "torchao")
LORA_STRATEGIES = ("auto", "merge", "side")
# Accepted names of the compute dtypes -> torch attribute names.
DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def parse_dtype(dtype: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    """Turn a dtype name (``"bf16"``, ``"float32"``, ...) or a ``torch.dtype`` into a ``torch.dtype``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"`{name}` must be one of {sorted(set(DTYPES))} or None, got {dtype!r}")
        import torch

        return getattr(torch, DTYPES[dtype.lower()])
    import torch

    allowed = {getattr(torch, attr) for attr in DTYPES.values()}
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        raise ValueError(f"`{name}` must be one of float32, bfloat16, float16, got {dtype!r}")
    return dtype


def check_dtype_name(dtype: Any, name: str) -> None:
    """:func:`parse_dtype`'s check without importing torch, for names (``torch.dtype`` values go through
    :func:`parse_dtype`)."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() in DTYPES):
        return
    parse_dtype(dtype, name)


@dataclass(frozen=True)
class StepCachePolicy:
    """When the step cache may skip (see :mod:`.cache`). ``max_skips``: consecutive skips allowed before
    a forced full step."""

    threshold: float
    warmup: int = 1
    final: int = 1
    max_skips: int = 3
    mask_aware: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"step_cache_threshold must be a number or None, got {self.threshold!r}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"step_cache_threshold must be finite and >= 0, got {self.threshold}")
        for name, low in (("warmup", 0), ("final", 0), ("max_skips", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"step_cache_{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs the model. Every optimization is one field, off by default.

    Attributes:
        dtype: compute dtype of the denoiser (``"bfloat16"``, ``"float16"``, ``"float32"``); ``None``
            keeps the dtype the weights were loaded in.
        attention: attention backend: ``"sdpa"``, ``"xformers"`` (CUDA), ``"triton"`` (the fused
            flash kernel with QK-norm and RoPE in its prologue) or ``"auto"`` (fastest on CUDA, measured
            once per shape; ``sdpa`` on CPU). See :mod:`fluxfill_engine.attention`.
        fused_kernels: use the fused custom ops (``fluxfill::qk_norm_rope`` before SDPA/xformers,
            ``fluxfill::fill_cond`` for the mask-latent conditioning).
        quant: ``"none"``, ``"fp8"`` (W8A8, dynamic per-token activations), ``"fp8-weight"``,
            ``"int8"`` (W8A8 dynamic) or ``"int8-weight"``: every linear layer inside the transformer
            blocks. See :mod:`fluxfill_engine.quantization`.
        quant_backend: ``"auto"``, ``"native"``, ``"quanto"`` or ``"torchao"``.
        quantize_text_encoder: weight-only quantization of T5 (the format of ``quant``; int8 when
            ``quant`` is ``"none"``).
        compile: regional ``torch.compile`` of the transformer blocks (``fullgraph=True``).
        compile_mode: ``"default"``, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"`` or
            ``"reduce-overhead"``.
        compile_dynamic: symbolic sequence length, so new resolutions reuse the compiled graphs.
        compile_cache_dir: where Inductor's artifacts are saved after warm-up and loaded from at start,
            so a second process warms up much faster. ``None``: no persistence beyond torch's own.
        step_cache_threshold: skip the remaining transformer blocks on steps whose first-block residual
            changed by less than this relative L1 since the last full step (``None``: off). See
            :mod:`fluxfill_engine.cache`.
        step_cache_warmup, step_cache_final: first / last steps always computed in full.
        step_cache_max_skips: consecutive skipped steps allowed before a forced full step.
        step_cache_mask_aware: measure the change only over image tokens inside the dilated mask.
        prompt_cache_size: how many encoded prompts the LRU prompt-embedding cache keeps (0 disables it).
        max_input_megapixels: input images larger than this are refused from their header, before
            they are decoded (decompression bombs, accidental huge files).
        max_loras: LoRAs one request may name (3, as the hosted FLUX Fill APIs).
        max_lora_rank: the largest LoRA rank accepted; the compiled side path pads every LoRA slot to
            it, so set it to the largest rank you serve.
        lora_strategy: ``"auto"`` (merge into an unquantized transformer, side path beside a quantized
            one), ``"merge"`` (write the set into the weights: no per-step cost, a cost per switch) or
            ``"side"`` (an unmerged low-rank path: a per-step cost, no switch cost). See
            :mod:`fluxfill_engine.lora`.
        lora_cache_size: how many loaded LoRA files stay in memory (least recently used dropped first).
        context_parallel: split each request's tokens over this many processes (Ulysses sequence
            parallel, for one request's latency): 1 (off) or a divisor of the model's attention heads
            (24 on FLUX.1: 2, 3, 4, 6, 8, 12, 24), launched as that many processes by ``torchrun
            --nproc-per-node N``. See :mod:`fluxfill_engine.parallel`.
        cpu_offload: the text encoders and the VAE live in host memory and are copied to the device only
            while they run (model CPU offload, the engine's own). See :mod:`fluxfill_engine.offload`.
        text_encoders_on_cpu: CLIP and T5 stay on the CPU and run there (no device memory; slow for a
            new prompt, the prompt cache serves repeats).
        block_streaming: the transformer's blocks live in host memory (pinned with CUDA) and each is
            copied to the device on a side stream while the one before it runs; blocks run eagerly
            (``compile=False``). :func:`fluxfill_engine.memory_plan.choose_memory_plan` picks these
            three fields (and ``quantize_text_encoder``) for a memory budget.
        quantize_on_cpu: with ``quant`` (and ``quantize_text_encoder``), quantize the weights in host
            memory and move only the quantized ones to the device: the device never holds the bf16
            weights (what a card smaller than them needs); the start pays the CPU's quantization time.
            The memory plans set it.
        precompute_modulation: compute every block's AdaLN modulation vectors (the M=batch products of
            the conditioning vector with ~3.2B parameters on FLUX.1) for all steps of a request at once,
            in ``prepare``, instead of every step. Equal up to the matmuls' batching; not with
            ``block_streaming`` (the blocks' weights are on the device only while each runs).
        attention_fp8: with ``attention="triton"``, both attention products in float8 e4m3 (q and k
            scaled from their norm weights, v per head, the probabilities unscaled): about 25 dB SQNR
            against the exact kernel on random inputs. CUDA needs fp8 tensor cores (compute
            capability 8.9+); on CPU the op runs a reference that rounds the same way.
    """

    dtype: str | None = None
    attention: str = "sdpa"
    fused_kernels: bool = False
    quant: str = "none"
    quant_backend: str = "auto"
    quantize_text_encoder: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_dynamic: bool = True
    compile_cache_dir: str | None = None
    step_cache_threshold: float | None = None
    step_cache_warmup: int = 1
    step_cache_final: int = 1
    step_cache_max_skips: int = 3
    step_cache_mask_aware: bool = False
    prompt_cache_size: int = 16
    max_input_megapixels: float = 40.0
    max_loras: int = 3
    max_lora_rank: int = 128
    lora_strategy: str = "auto"
    lora_cache_size: int = 8
    context_parallel: int = 1
    cpu_offload: bool = False
    text_encoders_on_cpu: bool = False
    block_streaming: bool = False
    precompute_modulation: bool = False
    attention_fp8: bool = False
    quantize_on_cpu: bool = False

    def __post_init__(self) -> None:
        check_dtype_name(self.dtype, "EngineConfig.dtype")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"EngineConfig.attention must be one of {list(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"EngineConfig.compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}"
            )
        if self.compile_cache_dir is not None and not isinstance(self.compile_cache_dir, str):
            raise TypeError(
                f"EngineConfig.compile_cache_dir must be a str path, got {self.compile_cache_dir!r}"
            )
        self._step_cache_policy(0.0 if self.step_cache_threshold is None else self.step_cache_threshold)
        names = (
            "fused_kernels",
            "quantize_text_encoder",
            "compile",
            "compile_dynamic",
            "step_cache_mask_aware",
            "cpu_offload",
            "text_encoders_on_cpu",
            "block_streaming",
            "quantize_on_cpu",
            "precompute_modulation",
            "attention_fp8",
        )
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.block_streaming and (self.compile or self.context_parallel > 1):
            raise ValueError(
                "EngineConfig.block_streaming runs the blocks eagerly on one device: set compile=False "
                "and context_parallel=1 with it"
            )
        if self.attention_fp8 and self.attention != "triton":
            raise ValueError(
                f"EngineConfig.attention_fp8 runs on attention='triton', got attention={self.attention!r}"
            )
        if self.block_streaming and self.precompute_modulation:
            raise ValueError(
                "EngineConfig.precompute_modulation reads every block's weights in prepare, which "
                "block_streaming keeps on the host: set one of them to False"
            )
        if self.quant not in QUANT_MODES:
            raise ValueError(f"EngineConfig.quant must be one of {list(QUANT_MODES)}, got {self.quant!r}")
        if self.quant_backend not in QUANT_BACKENDS:
            raise ValueError(
                f"EngineConfig.quant_backend must be one of {list(QUANT_BACKENDS)}, got {self.quant_backend!r}"
            )
        if isinstance(self.prompt_cache_size, bool) or not isinstance(self.prompt_cache_size, int):
            raise TypeError(f"EngineConfig.prompt_cache_size must be an int, got {self.prompt_cache_size!r}")
        if self.prompt_cache_size < 0:
            raise ValueError(f"EngineConfig.prompt_cache_size must be >= 0, got {self.prompt_cache_size}")
        limit = self.max_input_megapixels
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < math.inf:
            raise ValueError(f"EngineConfig.max_input_megapixels must be a finite number > 0, got {limit!r}")
        for name, low in (("max_loras", 0), ("max_lora_rank", 1), ("lora_cache_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"EngineConfig.{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"EngineConfig.{name} must be >= {low}, got {value}")
        if self.lora_strategy not in LORA_STRATEGIES:
            raise ValueError(
                f"EngineConfig.lora_strategy must be one of {list(LORA_STRATEGIES)}, got {self.lora_strategy!r}"
            )
        self._check_context_parallel()

    def _check_context_parallel(self) -> None:
        """What can be checked without the model: an int >= 1, and the process count when
        torch.distributed is running (the head-count divisor is checked where the model is known)."""
        value = self.context_parallel
        allowed = "1 (off) or a divisor of the model's attention heads (24 on FLUX.1: 2, 3, 4, 6, 8, 12, 24)"
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"EngineConfig.context_parallel must be an int, {allowed}; got {value!r}")
        if value < 1:
            raise ValueError(f"EngineConfig.context_parallel must be {allowed}; got {value}")
        dist = sys.modules.get("torch.distributed")  # never imported here: `fluxfill --help` stays instant
        if value > 1 and dist is not None and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world != value:
                raise ValueError(
                    f"EngineConfig.context_parallel={value}, but torch.distributed runs {world} processes: "
                    f"launch with `torchrun --nproc-per-node {value}` (or set context_parallel={world})"
                )

    @property
    def torch_dtype(self) -> torch.dtype | None:  # noqa: F821 (torch is imported for type checking only)
        return parse_dtype(self.dtype)

    def _step_cache_policy(self, threshold: float) -> StepCachePolicy:
        return StepCachePolicy(
            threshold=threshold,
            warmup=self.step_cache_warmup,
            final=self.step_cache_final,
            max_skips=self.step_cache_max_skips,
            mask_aware=self.step_cache_mask_aware,
        )

    @property
    def step_cache_policy(self) -> StepCachePolicy | None:
        """The step cache's policy, or ``None`` when the cache is off."""
        if self.step_cache_threshold is None:
            return None
        return self._step_cache_policy(self.step_cache_threshold)

    @property
    def text_encoder_quant(self) -> str:
        """The weight-only mode for T5 when ``quantize_text_encoder`` is on."""
        return "fp8-weight" if self.quant.startswith("fp8") else "int8-weight"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EngineConfig:
        """A named, tested combination of switches, with optional field overrides.

        ``reference``: every optimization off. The engine's own loop and transformer still run, with
        lossless rewrites only (fused QKV, the split input projection), so outputs equal diffusers'
        ``FluxFillPipeline`` up to float rounding.
        ``balanced``: bf16, regional compile, fused kernels, ``auto`` attention. Lossless up to bf16
        rounding.
        ``fast``: ``balanced`` + ``quant="fp8"`` (W8A8) with the ``auto`` backend, which runs int8
        weight-only where the GPU has no fp8 tensor cores.
        ``fastest``: ``fast`` + the step cache at threshold 0.08 (see :data:`FASTEST_STEP_CACHE_THRESHOLD`).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def describe(self) -> dict[str, Any]:
        """The configuration as a plain dict (what is switched on)."""
        return dataclasses.asdict(self)


# Why 0.08: a threshold's quality can only be judged on trained weights. The published operating point
# for FLUX.1-dev (the same transformer) is ParaAttention's First Block Cache at 0.08 (1.55x at 28 steps,
# quality judged acceptable there), and the step cache's criterion is the same relative L1 of the first
# block's residual. The random-weight sweep (benchmarks/results/step-cache-cpu-mid.md) cannot calibrate
# it: there the first-block change is ~0.4 every step, so 0.08 skips nothing and `fastest` runs like
# `fast`. To be re-chosen from measurements on trained weights.
FASTEST_STEP_CACHE_THRESHOLD = 0.08
_BALANCED = EngineConfig(dtype="bfloat16", compile=True, fused_kernels=True, attention="auto")
_FAST = dataclasses.replace(_BALANCED, quant="fp8", quant_backend="auto")
PRESETS: dict[str, EngineConfig] = {
    "reference": EngineConfig(),
    "balanced": _BALANCED,
    "fast": _FAST,
    "fastest": dataclasses.replace(_FAST, step_cache_threshold=FASTEST_STEP_CACHE_THRESHOLD),
}
