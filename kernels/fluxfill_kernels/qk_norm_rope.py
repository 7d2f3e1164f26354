"""``fluxfill::qk_norm_rope``: FLUX attention's query/key RMSNorm and rotary embedding in one pass.

``rope(rmsnorm(x) * w)`` for ``x`` in ``(q, k)``, in float32, written head-major (``[B, H, L, D]``,
contiguous) for attention. ``q, k`` are ``[B, L, H, D]`` and may be strided views of a fused QKV
projection; the norm weight is ``[D]``, or ``[2, D]`` with row 0 for the first ``txt_len`` (text)
tokens and row 1 for the rest (image tokens of a double-stream block). The rotary table is FLUX's
interleaved one: pairs ``(2i, 2i+1)`` rotate together.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native
from ._triton import HAS_TRITON, require_triton, tl, triton


def qk_norm_rope_shape(
    q: Tensor, k: Tensor, q_norm_w: Tensor, k_norm_w: Tensor, cos: Tensor, sin: Tensor, txt_len: int
) -> tuple[int, int, int, int]:
    """Check the inputs; the output shape ``(B, H, L, D)`` of each of ``q_out, k_out``. Raises ``ValueError``."""
    if q.dim() != 4 or k.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"qk_norm_rope: q and k must both be [B, L, H, D], got {list(q.shape)} and {list(k.shape)}"
        )
    batch, seq, heads, dim = q.shape
    if dim % 2:
        raise ValueError(f"qk_norm_rope: head dim must be even (rotary pairs), got {dim}")
    for name, w in (("q_norm_w", q_norm_w), ("k_norm_w", k_norm_w)):
        if tuple(w.shape) not in ((dim,), (2, dim)):
            raise ValueError(
                f"qk_norm_rope: {name} must be [D] or [2, D] with D = {dim}, got {list(w.shape)}"
            )
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (seq, dim):
            raise ValueError(f"qk_norm_rope: {name} must be [L, D] = {[seq, dim]}, got {list(table.shape)}")
    if not 0 <= txt_len <= seq:
        raise ValueError(f"qk_norm_rope: txt_len must lie in [0, L = {seq}], got {txt_len}")
    tensors = (q, k, q_norm_w, k_norm_w, cos, sin)
    if not all(t.is_floating_point() for t in tensors):
        raise ValueError(f"qk_norm_rope: inputs must be floating point, got {[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            f"qk_norm_rope: inputs must be on one device, got {[str(t.device) for t in tensors]}"
        )
    return batch, heads, seq, dim


def _per_token_weight(w: Tensor, seq: int, txt_len: int) -> Tensor:
    """``[D]`` or ``[2, D]`` -> float32 ``[L, D]`` (row 0 for the first ``txt_len`` tokens, row 1 after)."""
    w = w.float()
    if w.dim() == 1:
        return w.expand(seq, -1)
    return torch.cat((w[0].expand(txt_len, -1), w[1].expand(seq - txt_len, -1)))


def qk_norm_rope_ref(
    q: Tensor,
    k: Tensor,
    q_norm_w: Tensor,
    k_norm_w: Tensor,
    cos: Tensor,
    sin: Tensor,
    txt_len: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The definition. ``q, k [B, L, H, D]``, ``q_norm_w, k_norm_w [D] or [2, D]``, ``cos, sin [L, D]``
    -> ``(q_out, k_out)``, each ``[B, H, L, D]`` contiguous in its input's dtype.
    """
    _, _, seq, _ = qk_norm_rope_shape(q, k, q_norm_w, k_norm_w, cos, sin, txt_len)
    cos, sin = cos.float()[None, :, None, :], sin.float()[None, :, None, :]

    def one(x: Tensor, w: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        normed = normed * _per_token_weight(w, seq, txt_len)[None, :, None, :]
        even, odd = normed.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-odd, even), dim=-1).flatten(-2)
        return (normed * cos + rotated * sin).to(x.dtype).transpose(1, 2).contiguous()

    return one(q, q_norm_w), one(k, k_norm_w)


if HAS_TRITON:

    @triton.jit
    def _qk_norm_rope_kernel(
        q_ptr,
        k_ptr,
        qw_ptr,
        kw_ptr,
        cos_ptr,
        sin_ptr,
        q_out_ptr,
        k_out_ptr,
        seq,
        heads,
        txt_len,
        eps,
        q_sb,
        q_sl,
        q_sh,
        q_sd,
        k_sb,
        k_sl,
        k_sh,
        k_sd,
        qw_sr,
        qw_sd,
        kw_sr,
        kw_sd,
        cos_sl,
        cos_sd,
        sin_sl,
        sin_sd,
        dim: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_l = tl.program_id(0)
        head = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)
        tokens = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        rows = tokens.to(tl.int64)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        tile_ok = (tokens < seq)[:, None] & (d < dim)
        is_txt = (tokens < txt_len)[:, None]
        # pyright cannot type Triton's language inside a kernel (a constexpr tuple, tl.static_range): ignored.
        halves: tl.constexpr = (BLOCK_L, BLOCK_D // 2, 2)  # pyright: ignore[reportAssignmentType]

        # The rotary table is shared by q and k: loaded once, split into the pairs' even and odd members.
        # Whole-row tiles (split in registers) rather than stride-2 loads keep every load vectorized.
        cos = tl.load(cos_ptr + rows * cos_sl + d * cos_sd, mask=tile_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rows * sin_sl + d * sin_sd, mask=tile_ok, other=0.0).to(tl.float32)
        cos_e, cos_o = tl.split(tl.reshape(cos, halves))
        sin_e, sin_o = tl.split(tl.reshape(sin, halves))
        out_offsets = ((batch * heads + head) * seq + rows) * dim + d

        # Unrolled at compile time (no nested @jit helper, so the kernel can be re-wrapped for the
        # interpreter); iteration 0 is q, 1 is k.
        for which in tl.static_range(2):  # pyright: ignore[reportGeneralTypeIssues]
            if which == 0:
                x_ptrs = q_ptr + batch * q_sb + rows * q_sl + head * q_sh + d * q_sd
                w_ptrs = qw_ptr + d * qw_sd
                w_row = qw_sr
                out_ptrs = q_out_ptr + out_offsets
            else:
                x_ptrs = k_ptr + batch * k_sb + rows * k_sl + head * k_sh + d * k_sd
                w_ptrs = kw_ptr + d * kw_sd
                w_row = kw_sr
                out_ptrs = k_out_ptr + out_offsets
            x = tl.load(x_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
            # Row 0 of the weight for text tokens, row 1 (w_row: 0 for a [D] weight) for image tokens.
            # Loaded as full tiles: [1, D] loads get a layout of their own and cost layout conversions.
            w_ptrs = tl.broadcast_to(w_ptrs, (BLOCK_L, BLOCK_D))
            w_txt = tl.load(w_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
            w_img = tl.load(w_ptrs + w_row, mask=tile_ok, other=0.0).to(tl.float32)
            w = tl.where(is_txt, w_txt, w_img)
            rstd = tl.rsqrt(tl.sum(x * x, 1) / dim + eps)
            x = x * rstd[:, None] * w
            x_e, x_o = tl.split(tl.reshape(x, halves))
            out_e = x_e * cos_e - x_o * sin_e
            out_o = x_o * cos_o + x_e * sin_o
            out = tl.reshape(tl.join(out_e, out_o), (BLOCK_L, BLOCK_D))
            tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=tile_ok)


def _block_sizes(seq: int, dim: int) -> tuple[int, int]:
    """``(BLOCK_L, BLOCK_D)``: about 2K elements per q/k tile (16 tokens at D = 128)."""
    block_d = triton.next_power_of_2(dim)
    return max(1, min(2048 // block_d, triton.next_power_of_2(seq))), block_d


def qk_norm_rope_triton(
    q: Tensor,
    k: Tensor,
    q_norm_w: Tensor,
    k_norm_w: Tensor,
    cos: Tensor,
    sin: Tensor,
    txt_len: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The Triton launcher: same contract as :func:`qk_norm_rope_ref`. ``q, k`` may have any strides
    (they are read in place, never copied); one launch handles both.
    """
    require_triton("qk_norm_rope")
    batch, heads, seq, dim = qk_norm_rope_shape(q, k, q_norm_w, k_norm_w, cos, sin, txt_len)
    q_out = q.new_empty((batch, heads, seq, dim))
    k_out = k.new_empty((batch, heads, seq, dim))
    if q_out.numel() == 0:
        return q_out, k_out
    block_l, block_d = _block_sizes(seq, dim)
    # A [D] weight is a [2, D] one whose rows coincide: row stride 0.
    qw_sr = q_norm_w.stride(0) if q_norm_w.dim() == 2 else 0
    kw_sr = k_norm_w.stride(0) if k_norm_w.dim() == 2 else 0
    grid = (triton.cdiv(seq, block_l), heads, batch)
    # pyright cannot type Triton launches: it counts no *stride() spreads, knows no launch options
    # (num_warps), and takes plain values for tl.constexpr parameters; hence the ignores below.
    _qk_norm_rope_kernel[grid](
        q,
        k,
        q_norm_w,
        k_norm_w,
        cos,
        sin,
        q_out,
        k_out,
        seq,
        heads,
        txt_len,
        float(eps),
        *q.stride(),
        *k.stride(),
        qw_sr,  # pyright: ignore[reportCallIssue]
        q_norm_w.stride(-1),  # pyright: ignore[reportCallIssue]
        kw_sr,  # pyright: ignore[reportCallIssue]
        k_norm_w.stride(-1),  # pyright: ignore[reportCallIssue]
        *cos.stride(),
        *sin.stride(),
        dim=dim,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=4,  # pyright: ignore[reportCallIssue]
    )
    return q_out, k_out


@torch.library.custom_op("fluxfill::qk_norm_rope", mutates_args=(), device_types="cuda")
def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    q_norm_w: Tensor,
    k_norm_w: Tensor,
    cos: Tensor,
    sin: Tensor,
    txt_len: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``q, k [B, L, H, D]`` -> ``(rope(rmsnorm(q)), rope(rmsnorm(k)))``, each ``[B, H, L, D]`` (CUDA:
    Triton, or the native kernel, see :func:`native.use_native_on_cuda`)."""
    if native.use_native_on_cuda("qk_norm_rope"):
        qk_norm_rope_shape(q, k, q_norm_w, k_norm_w, cos, sin, txt_len)
        return torch.ops.fluxfill_native.qk_norm_rope(q, k, q_norm_w, k_norm_w, cos, sin, txt_len, eps)
    return qk_norm_rope_triton(q, k, q_norm_w, k_norm_w, cos, sin, txt_len, eps)


@qk_norm_rope.register_kernel("cpu")
def _qk_norm_rope_cpu(
    q: Tensor,
    k: Tensor,
    q_norm_w: Tensor,
    k_norm_w: Tensor,
    cos: Tensor,
    sin: Tensor,
    txt_len: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    if native.available("qk_norm_rope", "cpu"):
        qk_norm_rope_shape(q, k, q_norm_w, k_norm_w, cos, sin, txt_len)
        return torch.ops.fluxfill_native.qk_norm_rope(q, k, q_norm_w, k_norm_w, cos, sin, txt_len, eps)
    return qk_norm_rope_ref(q, k, q_norm_w, k_norm_w, cos, sin, txt_len, eps)


@qk_norm_rope.register_fake
def _qk_norm_rope_fake(
    q: Tensor,
    k: Tensor,
    q_norm_w: Tensor,
    k_norm_w: Tensor,
    cos: Tensor,
    sin: Tensor,
    txt_len: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    shape = qk_norm_rope_shape(q, k, q_norm_w, k_norm_w, cos, sin, txt_len)
    return q.new_empty(shape), k.new_empty(shape)
