"""The GPU run's two profiles (the real model on the GPU, the dry run on the CPU) and the step
variants its latency part measures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import DEFAULT_BUDGET_S, GPU_SHARES, PART_MINIMUMS

GUIDANCE = 30.0


@dataclass(frozen=True)
class StepVariant:
    """One way to run a transformer step: ``name`` is a ``fluxfill bench`` variant name."""

    name: str
    clone: bool  # works on a weight-sharing clone (it changes weights or installs compiled blocks)
    estimate_s: float  # seconds on an H100 with the real model, compile included (budget only)
    # Its own deadline: stopped (and recorded as such) past this many seconds, so one expensive row
    # cannot eat the rows and parts after it. None: only the part's deadline.
    limit_s: float | None = None
    # Which rows a run selects (``--rows``): "headline" (against diffusers), "more" (what explains the
    # presets), "lever" (the next optimizations to measure: the default, so a row appended for a new
    # lever is one).
    group: str = "lever"


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU run and the dry run: sizes, dtypes, repeats, budgets."""

    name: str
    device: str
    dtype: torch.dtype
    transformer_config: dict[str, Any] | None  # None: the real FLUX.1 Fill [dev]
    width: int
    height: int
    text_tokens: int
    kernel_heads: int
    kernel_head_dim: int
    kernel_text_tokens: int
    kernel_grid: tuple[int, int]  # image tokens as (rows, cols) of 2x2 latent patches
    triton_dtypes: tuple[str, ...]
    native_dtypes: tuple[str, ...]
    linear_shapes: tuple[tuple[int, int, int], ...]  # (rows, in_features, out_features)
    matmul_size: int
    copy_bytes: int
    warmup: int
    repeats: int
    e2e_steps: int
    e2e_warmup_steps: int
    step_cache_steps: int
    batch_sizes: tuple[int, ...]  # the latency part's batched engine steps (batch 1: ``reference``)
    shares: dict[str, float]
    budget_s: float
    # Compiled variants that compile for real; the others run their compiled modules under
    # torch.compiler.set_stance("force_eager"). None: all compile.
    real_compile: frozenset[str] | None = None
    notes: tuple[str, ...] = ()
    minimums: dict[str, float] = field(default_factory=dict)  # what a part keeps after earlier overruns
    rows: tuple[str, ...] | None = None  # the latency rows to run (names or ROW_GROUPS); None: all

    @property
    def dry_run(self) -> bool:
        return self.name == "dry-run"

    def transformer(self) -> dict[str, Any]:
        """The transformer's config: the real FLUX.1 Fill [dev], or the dry run's."""
        from ...architecture import TRANSFORMER_CONFIG

        return dict(self.transformer_config or TRANSFORMER_CONFIG)

    def compiles(self, name: str) -> bool:
        """Whether the compiled variant (or item) ``name`` compiles for real in this profile."""
        return self.real_compile is None or name in self.real_compile


def gpu_profile(budget_s: float = DEFAULT_BUDGET_S) -> Profile:
    """The real model at 1024x1024 on the GPU."""
    return Profile(
        name="gpu",
        device="cuda",
        dtype=torch.bfloat16,
        transformer_config=None,
        width=1024,
        height=1024,
        text_tokens=512,
        kernel_heads=24,
        kernel_head_dim=128,
        kernel_text_tokens=512,
        kernel_grid=(64, 64),
        triton_dtypes=("bfloat16", "float16"),
        native_dtypes=("bfloat16", "float16"),
        linear_shapes=((4608, 3072, 12288), (1, 3072, 18432)),  # MLP input; a modulation (1 row)
        matmul_size=8192,
        copy_bytes=2**30,
        warmup=2,
        repeats=8,
        e2e_steps=28,
        e2e_warmup_steps=2,
        step_cache_steps=8,
        batch_sizes=(2, 4),
        shares=dict(GPU_SHARES),
        budget_s=budget_s,
        minimums=dict(PART_MINIMUMS),
    )


def dry_run_profile(budget_s: float = 900.0) -> Profile:
    """The same code path on the CPU at a tiny size (the real classes at toy widths); the budget is
    generous so that nothing is skipped for time (the sizes keep it short: under a minute and a half on
    2 cores)."""
    from ...testing.random_models import reduced_configs

    return Profile(
        name="dry-run",
        device="cpu",
        dtype=torch.bfloat16,
        transformer_config=reduced_configs().transformer,
        width=64,
        height=64,
        text_tokens=16,
        kernel_heads=2,
        kernel_head_dim=32,
        kernel_text_tokens=16,
        kernel_grid=(4, 6),
        # The Triton interpreter's bf16 tl.dot is wrong (docs/contributing.md): bf16 is checked on the GPU only.
        triton_dtypes=("float16",),
        native_dtypes=("bfloat16", "float16"),
        linear_shapes=((48, 64, 256), (1, 64, 384)),
        matmul_size=256,
        copy_bytes=2**24,
        warmup=1,
        repeats=5,
        e2e_steps=2,
        e2e_warmup_steps=1,
        step_cache_steps=5,
        batch_sizes=(2, 4),
        # The shares fill 60% of the budget: the rest is slack that any part may use (a busy CI machine
        # can make even the machine part's tiny products take a minute).
        shares={
            part: share * 0.6 * budget_s / sum(GPU_SHARES.values()) for part, share in GPU_SHARES.items()
        },
        minimums={
            part: floor * 0.6 * budget_s / sum(GPU_SHARES.values()) for part, floor in PART_MINIMUMS.items()
        },
        budget_s=budget_s,
        # Three compiled variants compile for real: diffusers' regional compile, and the engine's
        # balanced and fast (quantized linears, fused kernels and compile together). torchao's cannot
        # run on a CPU, and the end-to-end `fast` call runs its compiled blocks eagerly: compiling it
        # again would only add time (about a minute of the dry run's budget on 2 cores is compile).
        real_compile=frozenset({"diffusers-compile", "balanced:compile_dynamic=0", "fast:compile_dynamic=0"}),
        notes=(
            "dry run: tiny model on the CPU; timings say nothing about a GPU",
            "Triton kernels run in the interpreter (TRITON_INTERPRET=1), bf16 only on a GPU",
        ),
    )


# In run order, most valuable first. The headline rows answer "how fast against diffusers": the drift
# reference, diffusers eager, the engine's compiled presets, diffusers' compiled baselines. Compiled
# rows at the benchmark's one size compile statically (compile_dynamic=0), as diffusers' regional
# compile does; the presets as served (dynamic shapes) are a row of their own, later. Then the rows that
# explain the presets (one switch at a time, eager), then the levers. Each compiled row has its own
# limit. Everything that changes weights, or compiles or installs blocks, gets a weight-sharing clone.
STEP_VARIANTS: tuple[StepVariant, ...] = (
    StepVariant("reference", clone=False, estimate_s=6, group="headline"),  # first: the drift reference
    StepVariant("diffusers", clone=False, estimate_s=5, group="headline"),
    StepVariant("balanced:compile_dynamic=0", clone=True, estimate_s=45, limit_s=120, group="headline"),
    StepVariant("fast:compile_dynamic=0", clone=True, estimate_s=50, limit_s=120, group="headline"),
    StepVariant("diffusers-compile", clone=True, estimate_s=40, limit_s=110, group="headline"),
    # torchao's quantize_ of ~500 linears and a fullgraph compile: 40-100 s (estimate).
    StepVariant("diffusers-fp8-compile", clone=True, estimate_s=80, limit_s=130, group="headline"),
    StepVariant("engine:attention=triton", clone=False, estimate_s=6, group="more"),
    StepVariant("engine:attention=xformers", clone=False, estimate_s=5, group="more"),
    StepVariant("engine:fused_kernels=1", clone=False, estimate_s=5, group="more"),
    StepVariant("engine:attention=auto", clone=False, estimate_s=6, group="more"),
    StepVariant("engine:quant=fp8,quant_backend=native", clone=True, estimate_s=10, group="more"),
    StepVariant("fast", clone=True, estimate_s=55, limit_s=110, group="more"),  # dynamic shapes, as served
    # Levers (issue 22 item 8), each against the row it changes: the modulation vectors once per request
    # (against `reference` eagerly and `fast:compile_dynamic=0` compiled), CUDA graphs (reduce-overhead,
    # against `balanced:compile_dynamic=0`), fp8 attention (against `engine:attention=triton`).
    StepVariant("engine:precompute_modulation=1", clone=False, estimate_s=6),
    StepVariant("fast:compile_dynamic=0,precompute_modulation=1", clone=True, estimate_s=50, limit_s=120),
    StepVariant(
        "balanced:compile_dynamic=0,compile_mode=reduce-overhead", clone=True, estimate_s=60, limit_s=150
    ),
    StepVariant("engine:attention=triton,attention_fp8=1", clone=False, estimate_s=6),
)
# The table's headline rows, by what a reader asks: (label, variant name). Ratios are against
# "diffusers eager" and the fastest diffusers row.
HEADLINE_ROWS: tuple[tuple[str, str], ...] = (
    ("diffusers eager", "diffusers"),
    ("diffusers compiled", "diffusers-compile"),
    ("diffusers + torchao fp8 + compile", "diffusers-fp8-compile"),
    ("engine reference (eager)", "reference"),
    ("engine balanced", "balanced:compile_dynamic=0"),
    ("engine fast", "fast:compile_dynamic=0"),
    ("engine fast, dynamic shapes", "fast"),
)
# The batched steps of the latency part: the engine's eager reference path (the server batches requests
# of one size; eager, so a batch size costs no compile). Its estimate is per image of the batch.
BATCHED = StepVariant("reference", clone=False, estimate_s=2.5, group="more")
# What a CPU cannot run but should still build as far as it gets, in the dry run.
TRY_ON_CPU = frozenset({"diffusers-fp8-compile"})
# The groups in run order: the levers (what to make the default next) before the rows that only explain.
ROW_GROUPS = ("headline", "lever", "more")


def rows_in_run_order(variants: tuple[StepVariant, ...] = STEP_VARIANTS) -> list[StepVariant]:
    """The latency rows by value: by group (:data:`ROW_GROUPS`), in the tuple's order within each."""
    return sorted(variants, key=lambda variant: ROW_GROUPS.index(variant.group))
