"""Joint attention backends: QK RMSNorm + RoPE + softmax attention over text-then-image tokens.

A block hands its raw projections over as :class:`JointQKV` (one entry per stream, text first) and gets
``[B, L, H*D]`` back. Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. Norm and RoPE in torch ops (the exact
  diffusers numerics), or with ``fused_kernels`` the one-pass ``fluxfill::qk_norm_rope`` op.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA, ``pip install xformers``), norm and
  RoPE as for ``sdpa``.
- ``triton``: ``fluxfill::fused_attention``, norm and RoPE in the flash kernel's prologue (on CPU
  tensors the op runs its pure-torch reference); with ``fp8``, ``fluxfill::fused_attention_fp8``: both
  products in float8 e4m3 (q, k, v and the probabilities rounded; CPU: the reference that rounds alike).
- ``auto``: on CUDA, the fastest available backend for each shape, timed once and remembered; on CPU
  ``sdpa``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ATTENTION_BACKENDS
from .layers import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class JointQKV:
    """Raw (un-normed, un-roped) projections ``[B, L_i, H, D]`` per stream, text stream first."""

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    q_norm: list[torch.Tensor]
    k_norm: list[torch.Tensor]
    eps: float

    def joined(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(q, k, v, q_norm_w, k_norm_w, txt_len)`` for the fused ops: streams concatenated along L,
        norm weights ``[2, D]`` (text row, image row) for two streams or ``[D]`` for one."""
        if len(self.q) == 1:
            return self.q[0], self.k[0], self.v[0], self.q_norm[0], self.k_norm[0], 0
        q, k, v = (torch.cat(parts, dim=1) for parts in (self.q, self.k, self.v))
        return q, k, v, torch.stack(self.q_norm), torch.stack(self.k_norm), self.q[0].shape[1]


AttentionFn = Callable[[JointQKV, Rope], torch.Tensor]


def _norm_rope_torch(qkv: JointQKV, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-stream RMSNorm in the input dtype, then RoPE: diffusers' exact order of operations."""
    norm = [
        (F.rms_norm(q, (q.shape[-1],), qw, qkv.eps), F.rms_norm(k, (k.shape[-1],), kw, qkv.eps))
        for q, k, qw, kw in zip(qkv.q, qkv.k, qkv.q_norm, qkv.k_norm, strict=True)
    ]
    q = torch.cat([pair[0] for pair in norm], dim=1) if len(norm) > 1 else norm[0][0]
    k = torch.cat([pair[1] for pair in norm], dim=1) if len(norm) > 1 else norm[0][1]
    v = torch.cat(qkv.v, dim=1) if len(qkv.v) > 1 else qkv.v[0]
    cos, sin = rope
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _norm_rope_fused(qkv: JointQKV, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over q and k: returns ``q, k`` as ``[B, H, L, D]`` and ``v`` as ``[B, L, H, D]``."""
    import fluxfill_kernels.qk_norm_rope  # noqa: F401  (registers the op)

    q, k, v, q_w, k_w, txt_len = qkv.joined()
    cos, sin = rope
    q, k = torch.ops.fluxfill.qk_norm_rope(q, k, q_w, k_w, cos, sin, txt_len, qkv.eps)
    return q, k, v


def sdpa_attention(fused_kernels: bool) -> AttentionFn:
    def attend(qkv: JointQKV, rope: Rope) -> torch.Tensor:
        if fused_kernels:
            q, k, v = _norm_rope_fused(qkv, rope)
            v = v.transpose(1, 2)
        else:
            q, k, v = (x.transpose(1, 2) for x in _norm_rope_torch(qkv, rope))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2, 3).to(v.dtype)

    return attend


def xformers_attention(fused_kernels: bool) -> AttentionFn:
    import xformers.ops  # pyright: ignore[reportMissingImports]  (an optional backend)

    def attend(qkv: JointQKV, rope: Rope) -> torch.Tensor:
        if fused_kernels:
            q, k, v = _norm_rope_fused(qkv, rope)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k, v = _norm_rope_torch(qkv, rope)
        return xformers.ops.memory_efficient_attention(q, k, v).flatten(2, 3).to(v.dtype)

    return attend


def triton_attention(fused_kernels: bool, fp8: bool = False) -> AttentionFn:
    import fluxfill_kernels.fused_attention  # noqa: F401  (registers the ops)

    op = torch.ops.fluxfill.fused_attention_fp8 if fp8 else torch.ops.fluxfill.fused_attention

    def attend(qkv: JointQKV, rope: Rope) -> torch.Tensor:
        q, k, v, q_w, k_w, txt_len = qkv.joined()
        cos, sin = rope
        return op(q, k, v, q_w, k_w, cos, sin, txt_len, qkv.eps)

    return attend


def cuda_time_ms(attend: AttentionFn, qkv: JointQKV, rope: Rope, repeats: int = 5) -> float:
    """Milliseconds for ``repeats`` calls after one warm-up call (Triton JIT, cuDNN plans)."""
    with torch.cuda.device(qkv.q[0].device):  # the events must be on the tensors' GPU
        attend(qkv, rope)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            attend(qkv, rope)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


class AutoAttention:
    """Times every candidate backend once per (shapes, dtype, device) and uses the fastest.

    ``choices`` records what was picked, per key, for inspection (``describe()``, benchmarks). A
    candidate that raises while it is timed (a kernel that fails to compile or launch) is dropped for
    good, its reason kept in ``dropped`` (``{name: "ErrorType: message"}``), and the choice is made among
    the rest; only when every candidate fails does ``choose`` raise.
    """

    def __init__(
        self,
        candidates: dict[str, AttentionFn],
        timer: Callable[[AttentionFn, JointQKV, Rope], float] = cuda_time_ms,
    ) -> None:
        self.candidates = candidates
        self.timer = timer
        self.choices: dict[tuple, str] = {}
        self.dropped: dict[str, str] = {}

    def choose(self, qkv: JointQKV, rope: Rope) -> str:
        key = (tuple(tuple(q.shape) for q in qkv.q), qkv.q[0].dtype, str(qkv.q[0].device))
        if key not in self.choices:
            if len(self.candidates) == 1:
                self.choices[key] = next(iter(self.candidates))
            else:
                self.choices[key] = self._fastest(qkv, rope)
        return self.choices[key]

    def _fastest(self, qkv: JointQKV, rope: Rope) -> str:
        times: dict[str, float] = {}
        for name, fn in self.candidates.items():
            if name in self.dropped:
                continue
            try:
                times[name] = self.timer(fn, qkv, rope)
            except Exception as error:  # noqa: BLE001 (any failure of one candidate leaves the others)
                self.dropped[name] = f"{type(error).__name__}: {str(error)[:500]}"
        if not times:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.dropped.items())
            raise RuntimeError(f"auto attention: every candidate failed ({reasons})")
        return min(times, key=lambda name: times[name])

    def __call__(self, qkv: JointQKV, rope: Rope) -> torch.Tensor:
        return self.candidates[self.choose(qkv, rope)](qkv, rope)


def resolve_attention(
    attention: AttentionFn,
    stream_lengths: list[int],
    batch: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> AttentionFn:
    """The concrete backend to use for these shapes: ``attention`` itself unless it is ``auto``, which
    is timed here (on random inputs of the right shapes), outside any compiled region."""
    if not isinstance(attention, AutoAttention):
        return attention

    def parts() -> list[torch.Tensor]:
        return [torch.randn(batch, n, heads, head_dim, dtype=dtype, device=device) for n in stream_lengths]

    ones = [torch.ones(head_dim, dtype=dtype, device=device) for _ in stream_lengths]
    qkv = JointQKV(parts(), parts(), parts(), ones, ones, eps=1e-6)
    total = sum(stream_lengths)
    rope = (torch.ones(total, head_dim, device=device), torch.zeros(total, head_dim, device=device))
    return attention.candidates[attention.choose(qkv, rope)]


def backend_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or ``None`` when it can."""
    if name == "xformers":
        if device.type != "cuda":
            return "xformers needs a CUDA device"
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed (pip install 'fluxfill-engine[gpu]')"
    if name == "triton" and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def available_backends(device: torch.device) -> list[str]:
    """The backends that can run on ``device`` (``auto`` always can)."""
    return [name for name in ATTENTION_BACKENDS if backend_unavailable_reason(name, device) is None]


_FACTORIES = {"sdpa": sdpa_attention, "xformers": xformers_attention, "triton": triton_attention}


def make_attention(
    name: str, device: torch.device, fused_kernels: bool = False, fp8: bool = False
) -> AttentionFn:
    """The attention function for backend ``name`` on ``device`` (``fp8``: the ``triton`` backend's
    float8 products).

    Raises ``ValueError`` naming why the backend is unavailable and listing the available ones.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {list(ATTENTION_BACKENDS)}")
    if fp8 and name != "triton":
        raise ValueError(f"fp8 attention runs on the 'triton' attention backend, not {name!r}")
    if fp8:
        return triton_attention(fused_kernels, fp8=True)
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(
            f"attention backend {name!r} is not available on {device}: {reason}; "
            f"available: {available_backends(device)}"
        )
    if name != "auto":
        return _FACTORIES[name](fused_kernels)
    if device.type != "cuda":
        return sdpa_attention(fused_kernels)
    candidates = [n for n in ("sdpa", "xformers", "triton") if backend_unavailable_reason(n, device) is None]
    return AutoAttention({n: _FACTORIES[n](fused_kernels) for n in candidates})
