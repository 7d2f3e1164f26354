"""The engine's transformer blocks, built on a diffusers block's own linear layers: shared, or fused from
several (QKV; in single-stream blocks QKV and the MLP input), so one copy of the weights serves both
module trees; quantized in both trees at once. :class:`~.model.FillTransformer` runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .attention import AttentionFn, JointQKV
from .layers import (
    RowSlice,
    fuse_linears,
    gelu_tanh,
    layer_norm,
    modulate,
    shares_storage,
)
from .lora.apply import base_layer
from .quantization import QuantPlan, quantize_linear

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


Source = tuple[nn.Module, str]  # (parent module in the diffusers tree, attribute name)


class LinearLayer(Protocol):
    """What a block uses of its linear layers, whichever module holds one: ``nn.Linear``, a quantized
    linear, :class:`~.layers.RowSlice` or the LoRA side-path wrapper (the blocks set them by name)."""

    @property
    def out_features(self) -> int: ...

    def __call__(self, x: torch.Tensor, /) -> torch.Tensor: ...


def _norm_eps(norm: nn.RMSNorm) -> float:
    """The epsilon of a block's q/k RMSNorm (optional in torch; FLUX always sets it, the kernels need it)."""
    if norm.eps is None:
        raise ValueError("the q/k RMSNorm has no eps; FLUX blocks set one")
    return norm.eps


def plain_linear(module: nn.Module, where: str) -> nn.Linear:
    """The ``nn.Linear`` under any LoRA wrapper; fusing and quantizing read its weight directly."""
    layer = base_layer(module)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{where}: expected an nn.Linear, got {type(layer).__name__}")
    return layer


def layer_agrees(mine: nn.Module, sources: list[Source]) -> bool:
    """Whether an engine layer still computes what its diffusers source layers hold: the same module
    (under any LoRA wrapper), slices of the same quantized module, or views of the same fused weight."""
    mine = base_layer(mine)
    current = [base_layer(getattr(*source)) for source in sources]
    if len(current) == 1:
        return current[0] is mine
    if all(isinstance(layer, RowSlice) for layer in current):
        return all(layer.fused is mine for layer in current)
    return isinstance(mine, nn.Linear) and shares_storage(mine, current)


class SharedLinearsBlock(nn.Module):
    """An engine block whose linear layers are the diffusers block's: shared, or fused from several.

    ``linear_sources`` maps each engine linear to where it lives in the diffusers module, which lets
    the block check that both trees still agree and quantize both to one shared copy.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear_sources: dict[str, list[Source]] = {}

    # A diffusers layer may be wrapped by peft (diffusers' LoRA mixin): the engine holds the layer under
    # the wrapper and runs the adapters itself (see .lora).
    def _share(self, name: str, source: Source) -> None:
        setattr(self, name, base_layer(getattr(*source)))
        self.linear_sources[name] = [source]

    def _fuse(self, name: str, sources: list[Source]) -> None:
        linears = [plain_linear(getattr(*source), f"{name} source {source[1]}") for source in sources]
        setattr(self, name, fuse_linears(linears))
        self.linear_sources[name] = sources

    def linears_in_sync(self) -> bool:
        return all(
            layer_agrees(getattr(self, name), sources) for name, sources in self.linear_sources.items()
        )

    def quantize(self, plan: QuantPlan) -> None:
        """Replace every linear with its quantized version, here and in the diffusers module."""
        for name, sources in self.linear_sources.items():
            quantized = quantize_linear(plain_linear(getattr(self, name), name), plan)
            setattr(self, name, quantized)
            if len(sources) == 1:
                setattr(*sources[0], quantized)
                continue
            start = 0
            for parent, attr in sources:
                rows = getattr(parent, attr).out_features
                setattr(parent, attr, RowSlice(quantized, start, start + rows))
                start += rows


class DoubleStreamBlock(SharedLinearsBlock):
    """Text and image streams with their own weights, joined only in attention."""

    img_mod: LinearLayer
    txt_mod: LinearLayer
    img_qkv: LinearLayer
    txt_qkv: LinearLayer
    img_out: LinearLayer
    txt_out: LinearLayer
    img_mlp_in: LinearLayer
    img_mlp_out: LinearLayer
    txt_mlp_in: LinearLayer
    txt_mlp_out: LinearLayer

    def __init__(self, block: FluxTransformerBlock) -> None:
        super().__init__()
        attn = block.attn
        self.num_heads = attn.heads
        self.eps = _norm_eps(attn.norm_q)
        self._share("img_mod", (block.norm1, "linear"))
        self._share("txt_mod", (block.norm1_context, "linear"))
        self._fuse("img_qkv", [(attn, "to_q"), (attn, "to_k"), (attn, "to_v")])
        self._fuse("txt_qkv", [(attn, "add_q_proj"), (attn, "add_k_proj"), (attn, "add_v_proj")])
        self.img_q_norm, self.img_k_norm = attn.norm_q.weight, attn.norm_k.weight
        self.txt_q_norm, self.txt_k_norm = attn.norm_added_q.weight, attn.norm_added_k.weight
        self._share("img_out", (attn.to_out, "0"))
        self._share("txt_out", (attn, "to_add_out"))
        self._share("img_mlp_in", (block.ff.net[0], "proj"))
        self._share("img_mlp_out", (block.ff.net, "2"))
        self._share("txt_mlp_in", (block.ff_context.net[0], "proj"))
        self._share("txt_mlp_out", (block.ff_context.net, "2"))

    def modulation(self, temb_act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The AdaLN vectors ``(img [N, 6D], txt [N, 6D])`` for ``temb_act = silu(temb) [N, D]``."""
        return self.img_mod(temb_act), self.txt_mod(temb_act)

    def _qkv(self, x: torch.Tensor, proj: LinearLayer) -> tuple[torch.Tensor, ...]:
        return proj(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb_act: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionFn,
        modulation: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``modulation``: this step's ``(img_mod(temb_act), txt_mod(temb_act))`` when computed ahead."""
        img_mod, txt_mod = self.modulation(temb_act) if modulation is None else modulation
        img_shift, img_scale, img_gate, img_mlp_shift, img_mlp_scale, img_mlp_gate = img_mod.chunk(6, dim=1)
        txt_shift, txt_scale, txt_gate, txt_mlp_shift, txt_mlp_scale, txt_mlp_gate = txt_mod.chunk(6, dim=1)

        img_q, img_k, img_v = self._qkv(modulate(layer_norm(img), img_shift, img_scale), self.img_qkv)
        txt_q, txt_k, txt_v = self._qkv(modulate(layer_norm(txt), txt_shift, txt_scale), self.txt_qkv)
        qkv = JointQKV(
            q=[txt_q, img_q],
            k=[txt_k, img_k],
            v=[txt_v, img_v],
            q_norm=[self.txt_q_norm, self.img_q_norm],
            k_norm=[self.txt_k_norm, self.img_k_norm],
            eps=self.eps,
        )
        txt_attn, img_attn = attention(qkv, rope).split_with_sizes([txt.shape[1], img.shape[1]], dim=1)

        img = img + img_gate[:, None] * self.img_out(img_attn.contiguous())
        mlp_in = modulate(layer_norm(img), img_mlp_shift, img_mlp_scale)
        img = img + img_mlp_gate[:, None] * self.img_mlp_out(gelu_tanh(self.img_mlp_in(mlp_in)))

        txt = txt + txt_gate[:, None] * self.txt_out(txt_attn.contiguous())
        mlp_in = modulate(layer_norm(txt), txt_mlp_shift, txt_mlp_scale)
        txt = txt + txt_mlp_gate[:, None] * self.txt_mlp_out(gelu_tanh(self.txt_mlp_in(mlp_in)))
        return img, _clip_fp16(txt)


class SingleStreamBlock(SharedLinearsBlock):
    """One stream over the joint text+image sequence; QKV and MLP-in are one fused GEMM."""

    mod: LinearLayer
    qkv_mlp: LinearLayer
    out: LinearLayer

    def __init__(self, block: FluxSingleTransformerBlock) -> None:
        super().__init__()
        attn = block.attn
        self.num_heads = attn.heads
        self.eps = _norm_eps(attn.norm_q)
        self.width = attn.inner_dim
        self._share("mod", (block.norm, "linear"))
        self._fuse("qkv_mlp", [(attn, "to_q"), (attn, "to_k"), (attn, "to_v"), (block, "proj_mlp")])
        self.q_norm, self.k_norm = attn.norm_q.weight, attn.norm_k.weight
        self._share("out", (block, "proj_out"))

    def modulation(self, temb_act: torch.Tensor) -> tuple[torch.Tensor]:
        """The AdaLN vector ``([N, 3D],)`` for ``temb_act = silu(temb) [N, D]``."""
        return (self.mod(temb_act),)

    def forward(
        self,
        x: torch.Tensor,
        temb_act: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionFn,
        modulation: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``modulation``: this step's ``(mod(temb_act),)`` when computed ahead."""
        (mod,) = self.modulation(temb_act) if modulation is None else modulation
        shift, scale, gate = mod.chunk(3, dim=1)
        qkv, mlp = self.qkv_mlp(modulate(layer_norm(x), shift, scale)).split(
            [3 * self.width, self.qkv_mlp.out_features - 3 * self.width], dim=-1
        )
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        joint = JointQKV(q=[q], k=[k], v=[v], q_norm=[self.q_norm], k_norm=[self.k_norm], eps=self.eps)
        hidden = torch.cat([attention(joint, rope), gelu_tanh(mlp)], dim=2)
        return _clip_fp16(x + gate[:, None] * self.out(hidden))
