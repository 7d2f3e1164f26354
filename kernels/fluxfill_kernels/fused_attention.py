"""Fused QK-RMSNorm + RoPE + flash attention: ``torch.ops.fluxfill.fused_attention``.

FLUX attends over the joint sequence (text tokens first, then image tokens) after RMS-normalising q and k
per stream (text and image have their own norm weights) and rotating them with interleaved RoPE. The
unfused model does that in five passes over q and k plus an SDPA launch and a transpose; here q, k and v
are read once, straight out of the fused QKV projection (any strides, last dim contiguous), and the
output comes out with heads already merged, ready for the output projection.

Kernel design (flash-attention 2): one program per (query tile, batch x head). The query tile is loaded,
normalised, rotated and pre-scaled by ``log2(e) / sqrt(D)`` once, so the loop computes ``exp2`` scores
directly; the loop keeps an fp32 accumulator with the online softmax. Only the ragged last key tile
masks its scores.

Where q and k are normalised and rotated (``k_prologue`` of :func:`fused_attention_triton`):

- ``"prepass"`` (the default): a small Triton kernel writes ``rope(rmsnorm(q))`` (pre-scaled) and
  ``rope(rmsnorm(k))`` once, in the input dtype, laid out ``[B, H, L, D]``; the attention loop then
  streams plain tiles. Numerically identical to ``"fused"`` (both round the rotated q and k to the
  input dtype before the ``QK^T`` dot). With no prologue in the attention kernel, its 128-row query
  tiles fit sm_90's 255 registers without spilling.
- ``"fused"``: q is normalised and rotated in the attention kernel's prologue, and every key tile as it
  is loaded, inside the attention loop (smaller tiles: the fp32 rope tiles take registers).

Why the pre-pass is the default (arithmetic, not measured here: no GPU was available). Each query tile
re-reads every key tile, so in-loop work on k is repeated ``L / BLOCK_M`` times (36 at 1024x1024). Per
key tile of ``64 x 128`` (bf16, H100) the loop's two GEMMs are ~4.2 MFLOP, ~1000 clocks of one SM's
tensor cores. The in-loop prologue adds fp32 cos and sin tiles (64 KB, from L2) to the 32 KB of k and v:
~96 KB per ~1000-1700 clocks is ~55-95 B/clock/SM, above H100's ~30 B/clock/SM of L2 bandwidth, plus
~10 fp32 CUDA-core ops per k element and a register-to-shared round trip the Hopper pipeliner cannot
overlap. The pre-pass costs one read and one write of q and k (~113 MB at 1024x1024, ~30-40 us at
3-4 TB/s) against ~0.5 ms of attention per layer. Benchmark both on a GPU before trusting this.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, require_triton, tl, triton

__all__ = [
    "fused_attention",
    "fused_attention_fp8",
    "fused_attention_fp8_ref",
    "fused_attention_ref",
    "fused_attention_triton",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = (16, 32, 64, 128)
_K_PROLOGUES = ("prepass", "fused")
_LOG2E = 1.4426950408889634
_FP8_MAX = 448.0  # the largest float8 e4m3fn value


# ---- validation ----------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
) -> None:
    """Raise ``ValueError`` naming the offending argument when the inputs do not fit the op."""
    if q.dim() != 4:
        raise ValueError(f"fused_attention: q must be [B, L, H, D], got shape {tuple(q.shape)}")
    batch, seq_len, heads, head_dim = q.shape
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(
                f"fused_attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(tensor.shape)}"
            )
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"fused_attention: {name} dtype must be one of {_DTYPES}, got {tensor.dtype}")
        if tensor.dtype != q.dtype:
            raise ValueError(f"fused_attention: {name} dtype {tensor.dtype} differs from q's {q.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"fused_attention: {name} is on {tensor.device}, q on {q.device}")
        if tensor.stride(-1) != 1:
            raise ValueError(f"fused_attention: {name} must be contiguous in its last dim (D)")
    if head_dim % 2 != 0:
        raise ValueError(f"fused_attention: head dim D must be even (RoPE rotates pairs), got {head_dim}")
    for name, weight in (("q_norm_w", q_norm_w), ("k_norm_w", k_norm_w)):
        if tuple(weight.shape) not in ((head_dim,), (2, head_dim)):
            raise ValueError(
                f"fused_attention: {name} must be [D] or [2, D] with D={head_dim}, got {tuple(weight.shape)}"
            )
        if weight.dtype not in _DTYPES:
            raise ValueError(f"fused_attention: {name} dtype must be one of {_DTYPES}, got {weight.dtype}")
        if weight.device != q.device:
            raise ValueError(f"fused_attention: {name} is on {weight.device}, q on {q.device}")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (seq_len, head_dim):
            raise ValueError(
                f"fused_attention: {name} must be [L, D] = [{seq_len}, {head_dim}], got {tuple(table.shape)}"
            )
        if table.dtype != torch.float32:
            raise ValueError(f"fused_attention: {name} must be float32, got {table.dtype}")
        if table.device != q.device:
            raise ValueError(f"fused_attention: {name} is on {table.device}, q on {q.device}")
    if not 0 <= txt_len <= seq_len:
        raise ValueError(f"fused_attention: txt_len must be in [0, L={seq_len}], got {txt_len}")


# ---- reference -----------------------------------------------------------------------------------


def _norm_rope_ref(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, txt_len: int, eps: float
) -> torch.Tensor:
    """``rope(rmsnorm(x))`` in fp32 for ``x [B, L, H, D]``; ``weight [D]`` or ``[2, D]`` (text, image)."""
    x = x.float()
    weight = weight.float()
    if weight.dim() == 2:
        is_txt = torch.arange(x.shape[1], device=x.device) < txt_len
        weight = torch.where(is_txt[:, None], weight[0], weight[1])[None, :, None, :]
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight
    cos, sin = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    rotated_even = x_even * cos[..., 0::2] - x_odd * sin[..., 0::2]
    rotated_odd = x_odd * cos[..., 1::2] + x_even * sin[..., 1::2]
    return torch.stack([rotated_even, rotated_odd], dim=-1).flatten(-2)


def fused_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
    eps: float,
) -> torch.Tensor:
    """The definition, in fp32: ``softmax(Q K^T / sqrt(D)) V`` with heads merged, in q's dtype.

    Args:
        q, k, v: ``[B, L, H, D]``, text tokens first (``txt_len`` of them), any strides.
        q_norm_w, k_norm_w: RMSNorm weights ``[D]``, or ``[2, D]``: row 0 for tokens ``< txt_len``,
            row 1 for the rest.
        cos, sin: ``[L, D]`` fp32 interleaved-pair RoPE table.
        txt_len: number of text tokens at the start of the sequence.
        eps: RMSNorm epsilon.

    Returns:
        ``[B, L, H * D]``, contiguous, q's dtype. ``Q = rope(rmsnorm(q))``, ``K = rope(rmsnorm(k))``,
        non-causal.
    """
    _check_inputs(q, k, v, q_norm_w, k_norm_w, cos, sin, txt_len)
    batch, seq_len, heads, head_dim = q.shape
    queries = _norm_rope_ref(q, q_norm_w, cos, sin, txt_len, eps)
    keys = _norm_rope_ref(k, k_norm_w, cos, sin, txt_len, eps)
    # SDPA rather than an explicit L x L score matrix: this is also the op's CPU kernel.
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), v.float().transpose(1, 2), scale=head_dim**-0.5
    )
    return out.transpose(1, 2).reshape(batch, seq_len, heads * head_dim).to(q.dtype).contiguous()


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float8 e4m3fn (saturating at +-448), back in fp32."""
    return x.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).float()


def _fp8_multiplier_ref(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``448 / (sqrt(D) * max|w|)``, as the kernels compute it (see ``_fp8_multiplier``)."""
    return _FP8_MAX / (math.sqrt(head_dim) * weight.float().abs().max().clamp_min(1e-12))


def fused_attention_fp8_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
    eps: float,
) -> torch.Tensor:
    """What the fp8 kernel computes, in fp32 torch ops: :func:`fused_attention_ref` with q, k, v and the
    softmax probabilities rounded to float8 e4m3 on the way into the two products.

    Scales: q and k by ``448 / (sqrt(D) * max|w|)`` of their norm weight (every element of
    ``rope(rmsnorm(x) * w)`` is within ``sqrt(D) * max|w|``), v by ``448 / max|v|`` per (batch, head);
    the probabilities ``exp(s - rowmax)`` lie in [0, 1] and are rounded unscaled. The row sums use the
    unrounded probabilities. Holds the ``[B, H, L, L]`` scores: for tests and CPU-sized inputs.
    """
    _check_inputs(q, k, v, q_norm_w, k_norm_w, cos, sin, txt_len)
    batch, seq_len, heads, head_dim = q.shape
    q_mul, k_mul = _fp8_multiplier_ref(q_norm_w, head_dim), _fp8_multiplier_ref(k_norm_w, head_dim)
    queries = _fp8_round(_norm_rope_ref(q, q_norm_w, cos, sin, txt_len, eps) * q_mul).transpose(1, 2)
    keys = _fp8_round(_norm_rope_ref(k, k_norm_w, cos, sin, txt_len, eps) * k_mul).transpose(1, 2)
    v_scale = _v_scale(v)[:, :, None, None]
    values = _fp8_round(v.float().transpose(1, 2) / v_scale)
    scores = queries @ keys.transpose(-1, -2) * (head_dim**-0.5 / (q_mul * k_mul))
    probs = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    out = _fp8_round(probs) @ values / probs.sum(dim=-1, keepdim=True) * v_scale
    return out.transpose(1, 2).reshape(batch, seq_len, heads * head_dim).to(q.dtype).contiguous()


# ---- Triton kernels ------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _load_rope_table(cos_ptr, sin_ptr, rows, row_mask, rope_row_stride, D: tl.constexpr):
        """The ``[R, D]`` fp32 cos and sin rows for token positions ``rows [R]``."""
        offsets = rows[:, None] * rope_row_stride + tl.arange(0, D)[None, :]
        cos = tl.load(cos_ptr + offsets, mask=row_mask[:, None], other=0.0)
        sin = tl.load(sin_ptr + offsets, mask=row_mask[:, None], other=0.0)
        return cos, sin

    @triton.jit
    def _norm_rope(x, is_txt, w_txt, w_img, cos, sin, eps, D: tl.constexpr):
        """``rope(rmsnorm(x))`` for an fp32 tile ``x [R, D]``; ``is_txt [R]`` picks the norm weight row."""
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        weight = tl.where(is_txt[:, None], w_txt[None, :], w_img[None, :])
        x = x * rstd[:, None] * weight
        # Pairs via reshape/split/join stay in registers (no second, unvectorisable load of x at d ^ 1):
        # partner[2i] = -x[2i+1], partner[2i+1] = x[2i].
        x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], D // 2, 2)))
        partner = tl.reshape(tl.join(-x_odd, x_even), (x.shape[0], D))
        return x * cos + partner * sin

    @triton.jit
    def _fp8_multiplier(w_ptr, w_row_stride, D: tl.constexpr):
        """``448 / (sqrt(D) * max|w|)``: ``rope(rmsnorm(x) * w)`` times this lies in e4m3's range.

        Each RMS-normalised row has squared norm D, so every rotated pair, and each of its elements, is
        at most ``sqrt(D) * max|w|`` in magnitude: a scale from the weights alone, no pass over the data.
        """
        offs_d = tl.arange(0, D)
        w_txt = tl.abs(tl.load(w_ptr + offs_d).to(tl.float32))
        w_img = tl.abs(tl.load(w_ptr + w_row_stride + offs_d).to(tl.float32))
        w_max = tl.maximum(tl.max(tl.maximum(w_txt, w_img), axis=0), 1e-12)
        return 448.0 / (tl.sqrt(D * 1.0) * w_max)

    @triton.jit
    def _qk_prepass_kernel(
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        q_w_ptr,
        k_w_ptr,
        cos_ptr,
        sin_ptr,
        stride_qb,
        stride_ql,
        stride_qh,
        stride_kb,
        stride_kl,
        stride_kh,
        stride_ob,
        stride_oh,
        stride_ol,
        q_w_row_stride,
        k_w_row_stride,
        rope_row_stride,
        v_ptr,
        v_out_ptr,
        v_scale_ptr,
        stride_vb,
        stride_vl,
        stride_vh,
        stride_vob,
        stride_voh,
        stride_vod,
        seq_len,
        txt_len,
        eps,
        qk_scale,
        D: tl.constexpr,
        BLOCK_L: tl.constexpr,
        FP8: tl.constexpr,
    ):
        """``q_out[b, h, l] = rope(rmsnorm(q[b, l, h])) * qk_scale``, ``k_out[b, h, l] = rope(rmsnorm(k))``.

        One program per (block of tokens, head, batch); q and k share the rope rows it loads. With
        ``FP8`` q and k are stored as float8 e4m3 scaled by :func:`_fp8_multiplier` (q without
        ``qk_scale``: the attention kernel folds it into its descale), and ``v / v_scale[b, h]`` too,
        D-strided (``v_out[b, h, d, l]``: the layout fp8 tensor cores read for ``P V``).
        """
        head = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        row_mask = rows < seq_len
        offs_d = tl.arange(0, D)
        is_txt = rows < txt_len
        cos, sin = _load_rope_table(cos_ptr, sin_ptr, rows, row_mask, rope_row_stride, D)
        out_offsets = batch * stride_ob + head * stride_oh + rows[:, None] * stride_ol + offs_d[None, :]

        q_offsets = batch * stride_qb + head * stride_qh + rows[:, None] * stride_ql + offs_d[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None], other=0.0).to(tl.float32)
        q_w_txt = tl.load(q_w_ptr + offs_d).to(tl.float32)
        q_w_img = tl.load(q_w_ptr + q_w_row_stride + offs_d).to(tl.float32)
        q = _norm_rope(q, is_txt, q_w_txt, q_w_img, cos, sin, eps, D)
        if FP8:  # noqa: SIM108 (a constexpr branch: Triton compiles one side only)
            q = tl.clamp(q * _fp8_multiplier(q_w_ptr, q_w_row_stride, D), -448.0, 448.0)
        else:
            q = q * qk_scale
        tl.store(q_out_ptr + out_offsets, q.to(q_out_ptr.dtype.element_ty), mask=row_mask[:, None])

        k_offsets = batch * stride_kb + head * stride_kh + rows[:, None] * stride_kl + offs_d[None, :]
        k = tl.load(k_ptr + k_offsets, mask=row_mask[:, None], other=0.0).to(tl.float32)
        k_w_txt = tl.load(k_w_ptr + offs_d).to(tl.float32)
        k_w_img = tl.load(k_w_ptr + k_w_row_stride + offs_d).to(tl.float32)
        k = _norm_rope(k, is_txt, k_w_txt, k_w_img, cos, sin, eps, D)
        if FP8:
            k = tl.clamp(k * _fp8_multiplier(k_w_ptr, k_w_row_stride, D), -448.0, 448.0)
        tl.store(k_out_ptr + out_offsets, k.to(k_out_ptr.dtype.element_ty), mask=row_mask[:, None])

        if FP8:
            v_offsets = batch * stride_vb + head * stride_vh + rows[:, None] * stride_vl + offs_d[None, :]
            v = tl.load(v_ptr + v_offsets, mask=row_mask[:, None], other=0.0).to(tl.float32)
            v = tl.clamp(v / tl.load(v_scale_ptr + batch * tl.num_programs(1) + head), -448.0, 448.0)
            v_out = batch * stride_vob + head * stride_voh + offs_d[None, :] * stride_vod + rows[:, None]
            tl.store(v_out_ptr + v_out, v.to(v_out_ptr.dtype.element_ty), mask=row_mask[:, None])

    @triton.jit
    def _attend_tile(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kl,
        stride_vl,
        stride_vd,
        start_n,
        seq_len,
        txt_len,
        k_w_txt,
        k_w_img,
        cos_ptr,
        sin_ptr,
        rope_row_stride,
        eps,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NORM_ROPE_K: tl.constexpr,
        MASK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        FP8: tl.constexpr,
        qk_descale,
    ):
        """One online-softmax step over the key/value tile starting at ``start_n``."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        n_mask = offs_n < seq_len
        k = tl.load(k_base + offs_n[:, None] * stride_kl + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v_offsets = offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd
        v = tl.load(v_base + v_offsets, mask=n_mask[:, None], other=0.0)
        if NORM_ROPE_K:
            cos, sin = _load_rope_table(cos_ptr, sin_ptr, offs_n, n_mask, rope_row_stride, D)
            k = _norm_rope(k.to(tl.float32), offs_n < txt_len, k_w_txt, k_w_img, cos, sin, eps, D)
            k = k.to(v.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if FP8:
            scores = scores * qk_descale
        if MASK_N:
            scores = tl.where(n_mask[None, :], scores, float("-inf"))
        # Scores are already in log2 units (the scale and log2(e) were folded into q).
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _fused_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        q_w_ptr,
        k_w_ptr,
        cos_ptr,
        sin_ptr,
        stride_qb,
        stride_ql,
        stride_qh,
        stride_kb,
        stride_kl,
        stride_kh,
        stride_vb,
        stride_vl,
        stride_vh,
        stride_vd,
        stride_ob,
        stride_ol,
        q_w_row_stride,
        k_w_row_stride,
        rope_row_stride,
        v_scale_ptr,
        seq_len,
        txt_len,
        num_heads,
        eps,
        qk_scale,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NORM_ROPE_Q: tl.constexpr,
        NORM_ROPE_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        FP8: tl.constexpr,
    ):
        """``out[b, m-tile, h*D:(h+1)*D]`` for program ``(m-tile, b * H + h)``.

        Without ``NORM_ROPE_Q``, q arrives normalised, rotated and scaled (the pre-pass's output). With
        ``FP8`` (pre-pass only), q, k and v arrive as float8 e4m3 (see :func:`_fp8_multiplier`), v laid out
        with D strided, and ``v_scale_ptr`` holds each (batch, head)'s v scale.
        """
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        batch = (pid_bh // num_heads).to(tl.int64)
        head = pid_bh % num_heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        m_mask = offs_m < seq_len

        q_base = q_ptr + batch * stride_qb + head * stride_qh
        q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        if NORM_ROPE_Q:
            cos, sin = _load_rope_table(cos_ptr, sin_ptr, offs_m, m_mask, rope_row_stride, D)
            q_w_txt = tl.load(q_w_ptr + offs_d).to(tl.float32)
            q_w_img = tl.load(q_w_ptr + q_w_row_stride + offs_d).to(tl.float32)
            q = _norm_rope(q.to(tl.float32), offs_m < txt_len, q_w_txt, q_w_img, cos, sin, eps, D)
            q = (q * qk_scale).to(q_ptr.dtype.element_ty)

        k_w_txt = tl.load(k_w_ptr + offs_d).to(tl.float32)
        k_w_img = tl.load(k_w_ptr + k_w_row_stride + offs_d).to(tl.float32)
        k_base = k_ptr + batch * stride_kb + head * stride_kh
        v_base = v_ptr + batch * stride_vb + head * stride_vh

        qk_descale = 1.0
        if FP8:
            q_mul = _fp8_multiplier(q_w_ptr, q_w_row_stride, D)
            k_mul = _fp8_multiplier(k_w_ptr, k_w_row_stride, D)
            qk_descale = qk_scale / (q_mul * k_mul)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        # pyright reads the helper's tl.constexpr MASK_N as a type and refuses a plain bool: ignored below.
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, stride_vd, start_n, seq_len, txt_len,
                k_w_txt, k_w_img, cos_ptr, sin_ptr, rope_row_stride, eps,
                D, BLOCK_N, NORM_ROPE_K, False, DOT_PRECISION, FP8, qk_descale,  # pyright: ignore[reportArgumentType]
            )  # fmt: skip
        if full_end < seq_len:
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, stride_vd, full_end, seq_len, txt_len,
                k_w_txt, k_w_img, cos_ptr, sin_ptr, rope_row_stride, eps,
                D, BLOCK_N, NORM_ROPE_K, True, DOT_PRECISION, FP8, qk_descale,  # pyright: ignore[reportArgumentType]
            )  # fmt: skip

        out = acc / l_i[:, None]
        if FP8:
            out = out * tl.load(v_scale_ptr + pid_bh)
        out_offsets = batch * stride_ob + offs_m[:, None] * stride_ol + head * D + offs_d[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


# ---- launcher ------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether the kernels were defined under ``TRITON_INTERPRET=1`` (decided once, at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fused_attention_kernel, InterpretedFunction)


def _attention_config(head_dim: int, dtype: torch.dtype, interpreted: bool, in_loop: bool) -> dict[str, int]:
    """Tile sizes and launch parameters for the attention kernel (``in_loop``: ``k_prologue="fused"``).

    The half-precision ``D = 128`` rows are FLUX's case, chosen so that ptxas (Triton 3.6 and 3.9, sm_90)
    spills no register; tests/kernels/test_kernels_compile_for_hopper.py holds them to that.
    """
    if interpreted:
        # The interpreter runs each program in Python; mid-size tiles keep it quick while still giving
        # several query and key tiles (and a ragged last one) at test sizes.
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        # Debug/parity path: fp32 tiles take twice the registers and shared memory.
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if head_dim == 128 and in_loop:
        # The q prologue and each key tile's norm + rope hold fp32 [rows, 128] tiles of x, cos and sin
        # live together: 64 query rows over 8 warps and unpipelined 32-key tiles are what fit 255
        # registers (4 warps, or a second stage, spill).
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1}
    if head_dim == 128:
        # 128 query rows per program amortise each k/v tile over a full wgmma M. The fp32 accumulator
        # (128x128) takes 64 of 8 warps' registers per thread; 64-key tiles spill under Triton 3.9
        # (32-key ones leave ~13 registers free), 3 stages of k+v (16 KB each) overlap the loads.
        return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    if head_dim == 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


# The q/k pre-pass: one program per (16 tokens, head, batch). fp32 q, k, cos and sin tiles of 16 x 128
# take ~170 registers over 4 warps without spilling (64 tokens spilled 2.4 KB per thread), and FLUX's
# 4608 tokens x 24 heads make 6912 programs for 132 SMs.
_PREPASS_CONFIG = {"BLOCK_L": 16, "num_warps": 4, "num_stages": 1}


def _check_fp8(q: torch.Tensor, k_prologue: str, interpreted: bool) -> None:
    """Raise ``ValueError`` where the fp8 path cannot run."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fused_attention_triton: fp8 takes float16 or bfloat16 inputs, got {q.dtype}")
    if k_prologue != "prepass":
        raise ValueError("fused_attention_triton: fp8 needs k_prologue='prepass'")
    if interpreted:
        raise ValueError(
            "fused_attention_triton: fp8 does not run in the Triton interpreter (its fp8 dot is wrong)"
        )
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError("fused_attention_triton: fp8 needs fp8 tensor cores (compute capability 8.9+)")


def _v_scale(v: torch.Tensor) -> torch.Tensor:
    """Each (batch, head)'s ``max|v| / 448`` (1 where v is all zeros): ``[B, H]`` fp32, contiguous."""
    amax = v.abs().amax(dim=(1, 3)).float()
    return torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax)).contiguous()


def _weight_row_stride(weight: torch.Tensor) -> int:
    """Offset from the text row to the image row: 0 for a single ``[D]`` weight."""
    return weight.stride(0) if weight.dim() == 2 else 0


def fused_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
    eps: float,
    *,
    k_prologue: Literal["prepass", "fused"] = "prepass",
    fp8: bool = False,
) -> torch.Tensor:
    """Launch the Triton kernel(s); same arguments and result as :func:`fused_attention_ref`.

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before import
    (fp32 and fp16 only there: the interpreter's bf16 ``tl.dot`` is wrong). q, k, v are read through
    their strides; nothing is transposed or copied first. ``D`` must be one of 16, 32, 64, 128.

    ``k_prologue``: ``"prepass"`` normalises and rotates k once in a separate kernel (default, see the
    module docstring for why), ``"fused"`` does it per key tile inside the attention loop.

    ``fp8``: both dots in float8 e4m3 (q, k, v and the probabilities; :func:`fused_attention_fp8_ref`
    is what this computes, up to the online softmax's running max). fp16/bf16 inputs, the pre-pass, a
    GPU with fp8 tensor cores (compute capability 8.9+); not in the interpreter, whose fp8 dot is wrong.
    """
    require_triton("fused_attention")
    _check_inputs(q, k, v, q_norm_w, k_norm_w, cos, sin, txt_len)
    batch, seq_len, heads, head_dim = q.shape
    if head_dim not in _TRITON_HEAD_DIMS:
        raise ValueError(f"fused_attention_triton: D must be one of {_TRITON_HEAD_DIMS}, got {head_dim}")
    if k_prologue not in _K_PROLOGUES:
        raise ValueError(
            f"fused_attention_triton: k_prologue must be one of {_K_PROLOGUES}, got {k_prologue!r}"
        )
    interpreted = _interpreted()
    if q.device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"fused_attention_triton: tensors on {q.device} need TRITON_INTERPRET=1 set before import "
            "(or use fused_attention_ref)"
        )
    if interpreted and q.dtype == torch.bfloat16:
        raise ValueError("fused_attention_triton: bfloat16 is not supported by the Triton interpreter")
    if fp8:
        _check_fp8(q, k_prologue, interpreted)

    out = torch.empty(batch, seq_len, heads * head_dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    # Tiny tables, already contiguous in practice (no-ops then); the kernel assumes unit last stride.
    q_norm_w, k_norm_w = q_norm_w.contiguous(), k_norm_w.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()

    # Triton launches on the current CUDA device, which need not be q's.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _launch(q, k, v, out, q_norm_w, k_norm_w, cos, sin, txt_len, eps, k_prologue, interpreted, fp8)
    return out


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
    eps: float,
    k_prologue: str,
    interpreted: bool,
    fp8: bool = False,
) -> None:
    """Run the kernel(s) writing ``out [B, L, H*D]``; inputs already validated."""
    batch, seq_len, heads, head_dim = q.shape
    qk_scale = _LOG2E / math.sqrt(head_dim)
    in_loop = k_prologue == "fused"
    # Stand-ins for the fp8-only arguments (the kernels compile those branches out).
    v_ready, v_scale = k, cos
    if not in_loop:
        ready_dtype = torch.float8_e4m3fn if fp8 else q.dtype
        q_ready = torch.empty(batch, heads, seq_len, head_dim, dtype=ready_dtype, device=q.device)
        k_ready = torch.empty_like(q_ready)
        if fp8:
            v_scale = _v_scale(v)
            v_ready = torch.empty(batch, heads, head_dim, seq_len, dtype=ready_dtype, device=q.device)
        # pyright cannot type Triton launches: it counts no *stride() spreads, knows no launch options
        # (num_warps), and takes plain values for tl.constexpr parameters; hence the ignores below.
        _qk_prepass_kernel[(triton.cdiv(seq_len, _PREPASS_CONFIG["BLOCK_L"]), heads, batch)](
            q, k, q_ready, k_ready, q_norm_w, k_norm_w, cos, sin,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_ready.stride(0), q_ready.stride(1), q_ready.stride(2),
            _weight_row_stride(q_norm_w), _weight_row_stride(k_norm_w), cos.stride(0),
            v, v_ready, v_scale,
            v.stride(0), v.stride(1), v.stride(2),
            v_ready.stride(0), v_ready.stride(1), v_ready.stride(2) if fp8 else 0,
            seq_len, txt_len, eps, qk_scale,
            D=head_dim, FP8=fp8, **_PREPASS_CONFIG,  # pyright: ignore[reportCallIssue, reportArgumentType]
        )  # fmt: skip
        # [B, H, L, D] seen as [B, L, H, D]: the attention kernel only needs the strides.
        q, k = q_ready.transpose(1, 2), k_ready.transpose(1, 2)
        if fp8:
            v = v_ready.permute(0, 3, 1, 2)  # [B, H, D, L] seen as [B, L, H, D]

    config = _attention_config(head_dim, q.dtype, interpreted, in_loop)
    grid = (triton.cdiv(seq_len, config["BLOCK_M"]), batch * heads)
    _fused_attention_kernel[grid](
        q, k, v, out, q_norm_w, k_norm_w, cos, sin,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1),
        _weight_row_stride(q_norm_w), _weight_row_stride(k_norm_w), cos.stride(0), v_scale,
        seq_len, txt_len, heads, eps, qk_scale,
        D=head_dim, NORM_ROPE_Q=in_loop, NORM_ROPE_K=in_loop, FP8=fp8,  # pyright: ignore[reportArgumentType]
        # fp32 must not silently drop to tf32 (the table holds fp32 to 1e-5).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # pyright: ignore[reportArgumentType]
        **config,  # pyright: ignore[reportArgumentType]
    )  # fmt: skip


# ---- the op --------------------------------------------------------------------------------------


@torch.library.custom_op("fluxfill::fused_attention", mutates_args=(), device_types="cuda")
def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
    eps: float,
) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(D)) V`` with ``Q, K = rope(rmsnorm(q, k))``: ``[B, L, H, D]`` -> ``[B, L, H*D]``.

    CUDA: the Triton kernel; CPU: :func:`fused_attention_ref`. See :func:`fused_attention_ref` for the
    arguments.
    """
    return fused_attention_triton(q, k, v, q_norm_w, k_norm_w, cos, sin, txt_len, eps)


fused_attention.register_kernel("cpu")(fused_attention_ref)


@fused_attention.register_fake
def _fused_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
    eps: float,
) -> torch.Tensor:
    _check_inputs(q, k, v, q_norm_w, k_norm_w, cos, sin, txt_len)
    batch, seq_len, heads, head_dim = q.shape
    return q.new_empty(batch, seq_len, heads * head_dim)


@torch.library.custom_op("fluxfill::fused_attention_fp8", mutates_args=(), device_types="cuda")
def fused_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_w: torch.Tensor,
    k_norm_w: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    txt_len: int,
    eps: float,
) -> torch.Tensor:
    """:func:`fused_attention` with both products in float8 e4m3 (CUDA: the Triton kernel, fp8 tensor
    cores needed; CPU: :func:`fused_attention_fp8_ref`)."""
    return fused_attention_triton(q, k, v, q_norm_w, k_norm_w, cos, sin, txt_len, eps, fp8=True)


fused_attention_fp8.register_kernel("cpu")(fused_attention_fp8_ref)
fused_attention_fp8.register_fake(_fused_attention_fake)
