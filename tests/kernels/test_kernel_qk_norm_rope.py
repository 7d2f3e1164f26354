"""``fluxfill::qk_norm_rope``: reference, Triton kernel (CPU interpreter without a GPU), op registration."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from fluxfill_engine.layers import apply_rope, rope_table
from fluxfill_kernels import qk_norm_rope as qk_module
from fluxfill_kernels._triton import HAS_TRITON
from fluxfill_kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton
from fluxfill_kernels.tolerances import assert_matches_reference
from tests.support import helpers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = helpers.KERNEL_DTYPES
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
EPS = 1e-6
AXES = {16: [4, 6, 6], 24: [8, 8, 8], 64: [8, 28, 28], 128: [16, 56, 56]}


def make_inputs(
    batch: int,
    seq: int,
    heads: int,
    dim: int,
    weights: str = "two",
    dtype=torch.float32,
    seed: int = 0,
    device: str = DEVICE,
):
    """q, k as views of a fused [B, L, 3*H*D + extra] projection; norm weights per ``weights``
    ("one": [D] both, "two": [2, D] both, "mixed": [2, D] for q, [D] for k); FLUX's rotary table."""
    gen = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, seq, 3 * heads * dim + 8, generator=gen).to(dtype)
    q, k, _ = fused[..., : 3 * heads * dim].unflatten(-1, (3, heads, dim)).unbind(2)
    rows = {"one": (1, 1), "two": (2, 2), "mixed": (2, 1)}[weights]
    q_w, k_w = ((1 + 0.5 * torch.randn(r, dim, generator=gen)).squeeze(0).to(dtype) for r in rows)
    ids = torch.randint(0, 64, (seq, 3), generator=gen).float()
    cos, sin = rope_table(ids, AXES[dim])
    return tuple(t.to(device) for t in (q, k, q_w, k_w, cos, sin))


def independent(x, w, cos, sin, txt_len: int) -> torch.Tensor:
    """F.rms_norm per text/image segment in float32, FLUX's apply_rope, head-major."""
    xf, dim = x.float(), x.shape[-1]
    if w.dim() == 1:
        normed = F.rms_norm(xf, (dim,), w.float(), EPS)
    else:
        normed = torch.cat(
            (
                F.rms_norm(xf[:, :txt_len], (dim,), w[0].float(), EPS),
                F.rms_norm(xf[:, txt_len:], (dim,), w[1].float(), EPS),
            ),
            dim=1,
        )
    return apply_rope(normed, cos, sin).to(x.dtype).transpose(1, 2)


# (B, L, H, D, txt_len, weights)
CASES = [
    (1, 177, 2, 16, 77, "two"),
    (2, 177, 1, 64, 77, "mixed"),
    (2, 5, 3, 16, 0, "one"),
    (2, 33, 2, 16, 0, "two"),
    (1, 9, 2, 64, 9, "two"),
    (1, 7, 1, 128, 3, "mixed"),
    (1, 10, 2, 24, 4, "two"),  # a head dim that is not a power of 2
]
CASE_IDS = ["-".join(map(str, case)) for case in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ref_matches_rms_norm_and_apply_rope(case, dtype) -> None:
    batch, seq, heads, dim, txt_len, weights = case
    q, k, q_w, k_w, cos, sin = make_inputs(batch, seq, heads, dim, weights, dtype, device="cpu")
    q_out, k_out = qk_norm_rope_ref(q, k, q_w, k_w, cos, sin, txt_len, EPS)
    for out, x, w in ((q_out, q, q_w), (k_out, k, k_w)):
        assert out.shape == (batch, heads, seq, dim) and out.dtype == dtype and out.is_contiguous()
        expected = independent(x, w, cos, sin, txt_len)
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        else:
            # Both round the same float32 math once; allow one unit in the last place.
            torch.testing.assert_close(out, expected)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_matches_ref(case, dtype) -> None:
    batch, seq, heads, dim, txt_len, weights = case
    q, k, q_w, k_w, cos, sin = make_inputs(batch, seq, heads, dim, weights, dtype, seed=1)
    assert not q.is_contiguous() and not k.is_contiguous()
    q_out, k_out = qk_norm_rope_triton(q, k, q_w, k_w, cos, sin, txt_len, EPS)
    q_ref, k_ref = qk_norm_rope_ref(q.float(), k.float(), q_w.float(), k_w.float(), cos, sin, txt_len, EPS)
    for out, ref in ((q_out, q_ref), (k_out, k_ref)):
        assert out.shape == (batch, heads, seq, dim) and out.dtype == dtype and out.is_contiguous()
        assert_matches_reference(out, ref)


@needs_triton
def test_triton_other_strides() -> None:
    """Head-major views, a strided head dim, and rotary tables sliced out of wider ones."""
    batch, seq, heads, dim, txt_len = 2, 12, 2, 16, 5
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(batch, heads, seq, dim, generator=gen).transpose(1, 2).to(DEVICE)
    k = torch.randn(batch, seq, heads, 2 * dim, generator=gen)[..., ::2].to(DEVICE)
    cos_wide, sin_wide = (torch.randn(seq, 2 * dim, generator=gen).to(DEVICE) for _ in range(2))
    cos, sin = cos_wide[:, dim:], sin_wide[:, ::2]
    q_w = torch.randn(2, 2 * dim, generator=gen)[:, :dim].to(DEVICE)
    k_w = torch.randn(dim, generator=gen).to(DEVICE)
    outs = qk_norm_rope_triton(q, k, q_w, k_w, cos, sin, txt_len, EPS)
    refs = qk_norm_rope_ref(q, k, q_w, k_w, cos.contiguous(), sin.contiguous(), txt_len, EPS)
    for out, ref in zip(outs, refs, strict=True):
        assert_matches_reference(out, ref)


def test_registered_op_on_cpu_matches_ref() -> None:
    inputs = make_inputs(2, 20, 2, 16, "mixed", torch.float16, device="cpu")
    outs = torch.ops.fluxfill.qk_norm_rope(*inputs, 7, EPS)
    refs = qk_norm_rope_ref(*inputs, 7, EPS)
    fp32_refs = qk_norm_rope_ref(*(t.float() for t in inputs), 7, EPS)
    for out, ref, fp32_ref in zip(outs, refs, fp32_refs, strict=True):
        assert_matches_reference(out, fp32_ref)
        if not qk_module.native.available("qk_norm_rope", "cpu"):
            assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_registered_op_on_cuda_matches_ref(dtype) -> None:
    q, k, q_w, k_w, cos, sin = make_inputs(2, 512 + 77, 4, 128, "two", dtype)
    outs = torch.ops.fluxfill.qk_norm_rope(q, k, q_w, k_w, cos, sin, 77, EPS)
    refs = qk_norm_rope_ref(q.float(), k.float(), q_w, k_w, cos, sin, 77, EPS)
    for out, ref in zip(outs, refs, strict=True):
        assert_matches_reference(out, ref)


def test_cpu_kernel_prefers_native(monkeypatch) -> None:
    calls = []

    def native_qk_norm_rope(*args):
        calls.append(args[-2:])
        return qk_norm_rope_ref(*args)

    monkeypatch.setattr(qk_module.native, "available", lambda op, device_type="cpu": True)
    monkeypatch.setattr(
        torch.ops, "fluxfill_native", types.SimpleNamespace(qk_norm_rope=native_qk_norm_rope), raising=False
    )
    inputs = make_inputs(1, 6, 1, 16, "two", device="cpu")
    outs = torch.ops.fluxfill.qk_norm_rope(*inputs, 2, EPS)
    assert calls == [(2, EPS)]
    for out, ref in zip(outs, qk_norm_rope_ref(*inputs, 2, EPS), strict=True):
        assert torch.equal(out, ref)


def test_opcheck() -> None:
    for weights, dtype in (("mixed", torch.float32), ("one", torch.float16)):
        inputs = make_inputs(2, 6, 2, 16, weights, dtype, device="cpu")
        torch.library.opcheck(torch.ops.fluxfill.qk_norm_rope.default, (*inputs, 2, EPS))


def test_compile_fullgraph_matches_eager() -> None:
    heads, dim = 2, 16

    def attention_inputs(qkv, q_w, k_w, cos, sin):
        q, k, v = qkv.unflatten(-1, (3, heads, dim)).unbind(2)
        q, k = torch.ops.fluxfill.qk_norm_rope(q, k, q_w, k_w, cos, sin, 3, EPS)
        return q * 2.0, k, v.transpose(1, 2)

    qkv = torch.randn(1, 8, 3 * heads * dim)
    q_w, k_w = torch.randn(2, dim), torch.randn(dim)
    cos, sin = rope_table(torch.randint(0, 8, (8, 3)).float(), AXES[dim])
    compiled = torch.compile(attention_inputs, fullgraph=True)
    for got, expected in zip(
        compiled(qkv, q_w, k_w, cos, sin), attention_inputs(qkv, q_w, k_w, cos, sin), strict=True
    ):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def _bad(**changes):
    inputs = dict(
        zip(
            ("q", "k", "q_norm_w", "k_norm_w", "cos", "sin"),
            make_inputs(1, 6, 2, 16, device="cpu"),
            strict=True,
        )
    )
    inputs["txt_len"] = 2
    inputs.update(changes)
    return inputs


BAD_INPUTS = [
    ("q k mismatch", dict(k=torch.zeros(1, 6, 3, 16)), "q and k must both be"),
    ("3-D q", dict(q=torch.zeros(6, 2, 16), k=torch.zeros(6, 2, 16)), "q and k must both be"),
    ("odd head dim", dict(q=torch.zeros(1, 6, 2, 15), k=torch.zeros(1, 6, 2, 15)), "even"),
    ("weight size", dict(q_norm_w=torch.ones(18)), r"q_norm_w must be \[D\] or \[2, D\]"),
    ("weight rows", dict(k_norm_w=torch.ones(3, 16)), r"k_norm_w must be \[D\] or \[2, D\]"),
    ("cos length", dict(cos=torch.ones(5, 16)), r"cos must be \[L, D\]"),
    ("sin dim", dict(sin=torch.ones(6, 8)), r"sin must be \[L, D\]"),
    ("txt_len too big", dict(txt_len=7), "txt_len"),
    ("txt_len negative", dict(txt_len=-1), "txt_len"),
]


@pytest.mark.parametrize("changes, message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_shapes_raise(changes, message) -> None:
    inputs = _bad(**changes)
    args = [inputs[name] for name in ("q", "k", "q_norm_w", "k_norm_w", "cos", "sin", "txt_len")]
    functions = [qk_norm_rope_ref, torch.ops.fluxfill.qk_norm_rope] + (
        [qk_norm_rope_triton] if HAS_TRITON else []
    )
    for function in functions:
        with pytest.raises(ValueError, match=message):
            function(*args, EPS)
