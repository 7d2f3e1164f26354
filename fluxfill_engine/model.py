"""The engine's FLUX Fill transformer, built from a loaded diffusers ``FluxTransformer2DModel``.

Differences from diffusers' forward, all lossless rewrites:

- QKV projections are one GEMM per stream (single-stream blocks also fuse the MLP input projection),
  with the diffusers module's weights turned into views of the fused ones (no second copy).
- The input projection is split: ``x_embedder(cat(x, cond)) = x @ W[:, :64].T + (cond @ W[:, 64:].T + b)``.
  The bracket is computed once per request (:meth:`FillTransformer.prepare`), only the 64 noise-latent
  channels every step.
- Text projection, RoPE table and the timestep/guidance/pooled-text embedding of every step are
  computed once per request; single-stream blocks concatenate text and image once, not per block.
- The forward is split into ``embed`` / ``first_block`` / ``remaining_blocks`` / ``final`` so a step
  cache can skip the remaining blocks.
- Context parallel (:mod:`.parallel`): with a :class:`~.parallel.ContextParallel` set, each rank runs the
  blocks on its share of the text and image tokens, attention exchanges heads for tokens, and the
  forward returns the full velocity on every rank.

The blocks themselves are in :mod:`.blocks`. Shapes: B batch, L image tokens, S text tokens, D model
width (3072), H heads, Dh head dim (128).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFn, make_attention, resolve_attention
from .blocks import (
    DoubleStreamBlock,
    SingleStreamBlock,
    Source,
    layer_agrees,
    plain_linear,
)
from .cache import BatchStepCache, StepCache
from .compilation import compile_blocks
from .layers import (
    layer_norm,
    modulate,
    rope_table,
    timestep_embedding,
)
from .lora.apply import LoraController, LoraLinear, LoraSlot, base_layer
from .parallel import ContextParallel, SequenceShard, UlyssesAttention, fingerprint
from .quantization import QuantPlan

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )


def engine_view(module: nn.Module) -> nn.Module:
    """A shallow copy of a small diffusers container (a time or text embedder) holding the same layers,
    so the engine can give its linears a LoRA side path without changing the diffusers module."""
    view = copy.copy(module)
    view._modules = {
        name: None if child is None else base_layer(child) for name, child in module._modules.items()
    }
    return view


@dataclass
class RequestInputs:
    """Everything the transformer needs that is fixed for one request (computed by ``prepare``).

    ``temb`` holds one conditioning vector per step: ``[num_steps, B, D]``. The attention functions
    are the concrete backends for the double- and single-stream shapes (``auto`` resolved).

    Under context parallel (``shard`` set) ``cond_proj`` holds this rank's image tokens and the
    attention functions are :class:`~.parallel.UlyssesAttention` wrappers; ``txt`` stays whole (a step
    callback may replace it) and is split every step. ``fingerprint`` of the request's inputs is
    compared across ranks at the first step.

    ``modulation`` (with ``precompute_modulation``): every block's AdaLN vectors for every step, one
    tuple per block in :meth:`FillTransformer.blocks` order, each tensor ``[num_steps, B, k*D]``.
    """

    cond_proj: torch.Tensor
    txt: torch.Tensor
    temb: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    double_attention: AttentionFn
    single_attention: AttentionFn
    shard: SequenceShard | None = None
    fingerprint: torch.Tensor | None = None
    modulation: list[tuple[torch.Tensor, ...]] | None = None


# One step's AdaLN vectors, a tuple per block (see RequestInputs.modulation).
StepModulation = list[tuple[torch.Tensor, ...]]


def _engine_blocks(blocks: nn.ModuleList) -> list[DoubleStreamBlock | SingleStreamBlock]:
    # nn.ModuleList is not generic: FillTransformer fills its two lists with these block classes only.
    return cast("list[DoubleStreamBlock | SingleStreamBlock]", list(blocks))


class _FluxConfig(Protocol):
    """The fields of a ``FluxTransformer2DModel`` config the engine reads (diffusers types the config as
    a plain dict)."""

    in_channels: int
    out_channels: int | None
    axes_dims_rope: Sequence[int]


class FillTransformer(nn.Module):
    """The engine's FLUX Fill transformer (see the module docstring for what differs from diffusers)."""

    # The layers outside the blocks; LoRA may wrap them in its side path.
    x_embedder: nn.Linear | LoraLinear
    context_embedder: nn.Linear | LoraLinear
    norm_out: nn.Linear | LoraLinear
    proj_out: nn.Linear | LoraLinear

    def __init__(
        self, transformer: FluxTransformer2DModel, attention: str = "sdpa", fused_kernels: bool = False
    ) -> None:
        super().__init__()
        config = cast(_FluxConfig, transformer.config)  # a FrozenDict with attribute access
        self.source = [transformer]  # a list, so the diffusers module is not registered as a child
        self.axes_dims_rope = tuple(config.axes_dims_rope)
        self.noise_channels = config.out_channels or config.in_channels
        # The split input projection slices x_embedder's weight at use (free views, never stale).
        self.x_embedder = plain_linear(transformer.x_embedder, "x_embedder")
        self.context_embedder = plain_linear(transformer.context_embedder, "context_embedder")
        embed = transformer.time_text_embed
        self.timestep_embedder = engine_view(embed.timestep_embedder)
        guidance_embedder: nn.Module | None = getattr(embed, "guidance_embedder", None)
        self.guidance_embedder = None if guidance_embedder is None else engine_view(guidance_embedder)
        self.text_embedder = engine_view(embed.text_embedder)
        # nn.ModuleList is not generic: diffusers fills these with its block classes.
        double_sources = cast("list[FluxTransformerBlock]", transformer.transformer_blocks)
        single_sources = cast("list[FluxSingleTransformerBlock]", transformer.single_transformer_blocks)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(b) for b in double_sources])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(b) for b in single_sources])
        self.norm_out = plain_linear(transformer.norm_out.linear, "norm_out.linear")
        self.proj_out = plain_linear(transformer.proj_out, "proj_out")
        # The layers outside the blocks: (engine owner, attribute) -> the diffusers source.
        self.outer_sources: dict[tuple[nn.Module, str], Source] = {
            (self, "x_embedder"): (transformer, "x_embedder"),
            (self, "context_embedder"): (transformer, "context_embedder"),
            (self, "norm_out"): (transformer.norm_out, "linear"),
            (self, "proj_out"): (transformer, "proj_out"),
        }
        for name in ("timestep_embedder", "guidance_embedder", "text_embedder"):
            view = getattr(self, name)
            if view is None:
                continue
            for child, layer in view.named_children():
                if isinstance(layer, nn.Linear):
                    self.outer_sources[(view, child)] = (getattr(embed, name), child)
        self._source_params = self._parameter_ids(transformer)
        self._quant_plan: QuantPlan | None = None
        self._compile_settings: tuple[str, bool] | None = None
        self.context_parallel: ContextParallel | None = None
        # Compute every block's modulation vectors for all steps in prepare (EngineConfig field).
        self.precompute_modulation = False
        self._ulysses: dict[tuple[AttentionFn, SequenceShard], UlyssesAttention] = {}
        self.set_attention(attention, fused_kernels)
        self.lora = LoraController(self._lora_slots(transformer))

    def blocks(self) -> list[DoubleStreamBlock | SingleStreamBlock]:
        """The double-stream blocks, then the single-stream ones."""
        return [*_engine_blocks(self.double_blocks), *_engine_blocks(self.single_blocks)]

    @staticmethod
    def _parameter_ids(module: nn.Module) -> tuple[int, ...]:
        # The engine holds every source parameter object, so none can be freed and its id reused.
        # LoRA weights of diffusers' adapters come and go without changing the base layers.
        return tuple(id(p) for name, p in module.named_parameters() if "lora_" not in name)

    def _lora_slots(self, transformer: FluxTransformer2DModel) -> list[LoraSlot]:
        """Every engine linear a LoRA can touch, with the diffusers layer paths it computes."""
        names = {id(module): name for name, module in transformer.named_modules()}

        def path(source: Source) -> str:
            parent, attr = source
            return f"{names[id(parent)]}.{attr}" if names[id(parent)] else attr

        slots = []
        for prefix, blocks in (("double_blocks", self.double_blocks), ("single_blocks", self.single_blocks)):
            for index, block in enumerate(_engine_blocks(blocks)):
                for name, sources in block.linear_sources.items():
                    rows, start = [], 0
                    for source in sources:
                        rows.append((start, start + plain_linear(getattr(*source), name).out_features))
                        start = rows[-1][1]
                    layer = plain_linear(getattr(block, name), name)
                    key = f"{prefix}.{index}.{name}"
                    paths = tuple(path(s) for s in sources)
                    slots.append(LoraSlot(key, block, name, paths, tuple(rows), layer.in_features, True))
        for (owner, attr), source in self.outer_sources.items():
            layer = plain_linear(getattr(owner, attr), attr)
            rows = ((0, layer.out_features),)
            slots.append(LoraSlot(path(source), owner, attr, (path(source),), rows, layer.in_features, False))
        return slots

    @classmethod
    def from_diffusers(
        cls, transformer: FluxTransformer2DModel, attention: str = "sdpa", fused_kernels: bool = False
    ) -> FillTransformer:
        """Build from a diffusers ``FluxTransformer2DModel`` (weights shared, QKV fused in place)."""
        return cls(transformer, attention, fused_kernels).eval().requires_grad_(False)

    def set_attention(
        self, name: str, fused_kernels: bool = False, device: torch.device | None = None, fp8: bool = False
    ) -> None:
        """Switch the attention backend (see :mod:`.attention`) for ``device`` (default: where the
        weights are; under model CPU offload the hook's execution device); no-op when nothing changes."""
        device = self.proj_out.weight.device if device is None else device
        if getattr(self, "attention_choice", None) == (name, fused_kernels, device, fp8):
            return
        self.attention = make_attention(name, device, fused_kernels, fp8)
        self.attention_choice = (name, fused_kernels, device, fp8)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def is_in_sync(self) -> bool:
        """Whether this engine still shares its weights with the diffusers module it was built from.

        Moving or casting the diffusers module (``.to(...)``) gives its layers fresh tensors; the fused
        views then no longer alias them and the engine must be rebuilt. Likewise when any parameter
        object was replaced (``module.weight = nn.Parameter(...)``).
        """
        source = self.source[0]
        if self._parameter_ids(source) != self._source_params:
            return False
        if not all(layer_agrees(getattr(*mine), [theirs]) for mine, theirs in self.outer_sources.items()):
            return False
        return all(block.linears_in_sync() for block in self.blocks())

    def set_context_parallel(self, parallel: ContextParallel | None) -> None:
        """Split each request's tokens over ``parallel``'s ranks (see :mod:`.parallel`), or ``None`` for
        one process; keeps the current one when equal (compiled blocks keep seeing the same wrappers)."""
        if parallel is None or not parallel.same_as(self.context_parallel):
            self.context_parallel = parallel
            self._ulysses.clear()

    def _ulysses_attention(self, inner: AttentionFn, shard: SequenceShard) -> UlyssesAttention:
        key = (inner, shard)
        if key not in self._ulysses:
            self._ulysses[key] = UlyssesAttention(inner, shard)
        return self._ulysses[key]

    @property
    def compile_settings(self) -> tuple[str, bool] | None:
        """``(mode, dynamic)`` the blocks are compiled with, or None when they run eagerly."""
        return self._compile_settings

    def set_compile(self, settings: tuple[str, bool] | None, device: torch.device | None = None) -> None:
        """Compile the blocks with ``(mode, dynamic)`` for ``device`` (default: where the weights are),
        or run them eagerly again with ``None``."""
        if settings == self._compile_settings:
            return
        blocks = [*self.double_blocks, *self.single_blocks]
        if settings is None:
            for block in blocks:
                block._compiled_call_impl = None  # what Module.compile set: back to eager
        else:
            compile_blocks(
                blocks, *settings, device=self.proj_out.weight.device if device is None else device
            )
        self._compile_settings = settings

    @property
    def quant_plan(self) -> QuantPlan | None:
        return self._quant_plan

    def quantize(self, plan: QuantPlan) -> None:
        """Quantize every linear layer inside the transformer blocks, in both module trees.

        Embedders, the final layer and norms stay in the compute dtype: they are a small share of the
        FLOPs and bytes, and the input/output projections and modulation scales are where quantization
        error would reach the latents most directly.
        """
        if self._quant_plan is not None:
            raise ValueError(f"the transformer is already quantized ({self._quant_plan.mode})")
        if getattr(self.source[0], "peft_config", None):
            raise ValueError(
                "the transformer has diffusers LoRA adapters loaded (load_lora_weights), and quantization "
                "replaces the layers they wrap. Quantize without them (pipe.unload_lora_weights()) and "
                "give LoRAs to the engine instead (pipe.set_engine_loras(...) or FillRequest.loras), which "
                "runs them on a quantized transformer"
            )
        self.lora.reset()
        for block in self.blocks():
            block.quantize(plan)
        self._quant_plan = plan
        self._source_params = self._parameter_ids(self.source[0])

    # ---- once per request -------------------------------------------------------------------------

    def time_embedding(
        self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor
    ) -> torch.Tensor:
        """Timestep (+ guidance) + pooled-text conditioning vector ``[N, D]``; inputs already x1000."""
        temb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        if self.guidance_embedder is not None and guidance is not None:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return temb + self.text_embedder(pooled)

    def prepare(
        self,
        cond: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: float | None,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        latents_dtype: torch.dtype,
    ) -> RequestInputs:
        """Per-request precomputation.

        ``timesteps`` are the schedule's ``sigma * 1000`` (float32, one per step). They are rounded
        through ``latents_dtype`` and the model dtype exactly as diffusers' pipeline and transformer
        do, so a bf16 run conditions on the same values as diffusers' bf16 run.
        """
        dtype = self.dtype
        batch = cond.shape[0]
        weight = self.x_embedder.weight
        cond_proj = F.linear(cond.to(dtype), weight[:, self.noise_channels :], self.x_embedder.bias)
        if isinstance(self.x_embedder, LoraLinear) and self.x_embedder.active:
            columns = (self.noise_channels, weight.shape[1])
            cond_proj = cond_proj + self.x_embedder.delta(cond.to(dtype), columns).to(dtype)
        txt = self.text_embedding(prompt_embeds)
        steps = timesteps.shape[0]
        step_t = ((timesteps.to(latents_dtype) / 1000).to(dtype) * 1000).repeat_interleave(batch)
        pooled = pooled_prompt_embeds.to(dtype).repeat(steps, 1)
        guidance_t = None
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this transformer embeds a guidance scale: give guidance")
            guidance_t = torch.full([steps * batch], guidance, device=cond.device, dtype=torch.float32)
            guidance_t = guidance_t.to(dtype) * 1000
        temb = self.time_embedding(step_t, guidance_t, pooled).unflatten(0, (steps, batch))
        modulation = self.modulation_for_steps(temb) if self.precompute_modulation else None
        rope = rope_table(torch.cat((txt_ids, img_ids), dim=0), self.axes_dims_rope)
        num_heads = self.blocks()[0].num_heads
        head_dim = txt.shape[-1] // num_heads
        parallel = self.context_parallel
        heads = num_heads if parallel is None else num_heads // parallel.size
        text_len, image_len = txt.shape[1], cond.shape[1]

        def resolve(lengths: list[int]) -> AttentionFn:
            return resolve_attention(self.attention, lengths, batch, heads, head_dim, dtype, cond.device)

        double = resolve([text_len, image_len])
        single = resolve([text_len + image_len])
        if parallel is None:
            return RequestInputs(cond_proj, txt, temb, rope, double, single, modulation=modulation)
        shard = parallel.shard(text_len, image_len)
        double = self._ulysses_attention(parallel.agree_on_backend(self.attention, double), shard)
        single = self._ulysses_attention(parallel.agree_on_backend(self.attention, single), shard)
        inputs_print = fingerprint(cond, prompt_embeds, pooled_prompt_embeds, timesteps)
        return RequestInputs(
            shard.split_image(cond_proj), txt, temb, rope, double, single, shard, inputs_print, modulation
        )

    def modulation_for_steps(self, temb: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Every block's AdaLN vectors for ``temb [num_steps, B, D]``: one matmul per linear over all steps.

        They depend only on the timestep, guidance and pooled text, so the per-step M=B products over the
        blocks' modulation weights (~3.2B parameters on FLUX.1) become one M=num_steps*B product each.
        """
        steps, batch = temb.shape[:2]
        temb_act = F.silu(temb).flatten(0, 1)
        return [
            tuple(vector.unflatten(0, (steps, batch)) for vector in block.modulation(temb_act))
            for block in self.blocks()
        ]

    def text_embedding(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.context_embedder(prompt_embeds.to(self.dtype))

    # ---- every step --------------------------------------------------------------------------------

    def embed(self, latents: torch.Tensor, cond_proj: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.dtype)
        img = F.linear(latents, self.x_embedder.weight[:, : self.noise_channels]) + cond_proj
        if isinstance(self.x_embedder, LoraLinear) and self.x_embedder.active:
            img = img + self.x_embedder.delta(latents, (0, self.noise_channels)).to(img.dtype)
        return img

    def first_block(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb_act: torch.Tensor,
        inputs: RequestInputs,
        modulation: StepModulation | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first double-stream block; ``temb_act`` is ``silu(temb)``; ``modulation``: this step's
        precomputed vectors (all blocks), or ``None`` to compute them from ``temb_act``."""
        mod = None if modulation is None else modulation[0]
        return self.double_blocks[0](img, txt, temb_act, inputs.rope, inputs.double_attention, mod)

    def remaining_blocks(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb_act: torch.Tensor,
        inputs: RequestInputs,
        modulation: StepModulation | None = None,
    ) -> torch.Tensor:
        """Double-stream blocks 1.. and all single-stream blocks; returns the image tokens."""
        doubles = len(self.double_blocks)
        for index, block in enumerate(self.double_blocks[1:], start=1):
            mod = None if modulation is None else modulation[index]
            img, txt = block(img, txt, temb_act, inputs.rope, inputs.double_attention, mod)
        text_len = txt.shape[1]
        joint = torch.cat([txt, img], dim=1)
        for index, block in enumerate(self.single_blocks, start=doubles):
            mod = None if modulation is None else modulation[index]
            joint = block(joint, temb_act, inputs.rope, inputs.single_attention, mod)
        return joint[:, text_len:]

    def final(self, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.norm_out(F.silu(temb).to(img.dtype)).chunk(2, dim=1)
        hidden = modulate(layer_norm(img), shift, scale)
        # The class's forward, not the module's: diffusers' enable_parallelism hooks proj_out (shared
        # with the diffusers module) to gather its output, and the engine gathers itself.
        base = base_layer(self.proj_out)
        out = type(base).forward(base, hidden)
        if isinstance(self.proj_out, LoraLinear) and self.proj_out.active:
            self.proj_out._add_side(out, hidden)  # what LoraLinear.forward adds
        return out

    def forward(
        self,
        latents: torch.Tensor,
        step: int,
        inputs: RequestInputs,
        cache: StepCache | BatchStepCache | None = None,
    ) -> torch.Tensor:
        """The velocity prediction ``[B, L, 64]`` for packed noisy ``latents`` at step index ``step``.

        With a ``cache``, the remaining blocks run only on steps the cache does not skip (with a
        :class:`~.cache.BatchStepCache`, only on the rows of the requests that compute the step). Under context
        parallel (``inputs.shard``) this rank runs its share of the tokens and every rank gets the
        whole velocity back.
        """
        shard = inputs.shard
        txt = inputs.txt
        if shard is not None:
            if inputs.fingerprint is not None:  # the request's first step: do all ranks run the same?
                shard.check_same_inputs(torch.cat([inputs.fingerprint, fingerprint(latents)]))
                inputs.fingerprint = None
            latents, txt = shard.split_image(latents), shard.split_text(txt)
        temb = inputs.temb[step]
        temb_act = F.silu(temb)
        modulation = None
        if inputs.modulation is not None:
            modulation = [tuple(vector[step] for vector in block) for block in inputs.modulation]
        img = self.embed(latents, inputs.cond_proj)
        first_img, txt = self.first_block(img, txt, temb_act, inputs, modulation)
        if cache is None:
            out = self.remaining_blocks(first_img, txt, temb_act, inputs, modulation)
        else:

            def remaining(rows: torch.Tensor | None) -> torch.Tensor:
                if rows is None:
                    return self.remaining_blocks(first_img, txt, temb_act, inputs, modulation)
                rows_modulation = None
                if modulation is not None:
                    rows_modulation = [tuple(vector[rows] for vector in block) for block in modulation]
                return self.remaining_blocks(
                    first_img[rows], txt[rows], temb_act[rows], inputs, rows_modulation
                )

            out = cache.apply(step, img, first_img, remaining, shard)
        velocity = self.final(out, temb)
        return velocity if shard is None else shard.gather_image(velocity)
