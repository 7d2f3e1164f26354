"""``fluxfill::fused_attention``: Triton kernel vs the fp32 reference, the reference vs the model's own
formulation (per-stream ``F.rms_norm``, ``apply_rope``, SDPA), and the op's registration (opcheck, compile).

Without a GPU the Triton kernel runs in Triton's CPU interpreter (fp32 and fp16 only), so shapes are small.
"""

import pytest
import torch
import torch.nn.functional as F

from fluxfill_engine.layers import apply_rope, rope_table
from fluxfill_kernels._triton import HAS_TRITON
from fluxfill_kernels.fused_attention import (
    fused_attention,
    fused_attention_ref,
    fused_attention_triton,
)
from fluxfill_kernels.tolerances import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
TXT_LEN = 77
SEQ_LEN = TXT_LEN + 100  # not a multiple of any tile size: the last query and key tiles are ragged

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def make_inputs(
    batch: int,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    two_row_weights: bool = True,
    flux_rope: bool = False,
    txt_len: int = TXT_LEN,
    device: str = DEVICE,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """``(q, k, v, q_norm_w, k_norm_w, cos, sin)``; q, k, v are strided views of one fused projection.

    The projection also carries extra (MLP-like) channels, as FLUX's single-stream blocks do, so the
    views' token stride is not ``3 * H * D``. The RoPE table is FLUX's (pairs share an angle) or, by
    default, one random angle per element, which exercises the general interleaved formula.
    """
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(batch, seq_len, 3 * heads * head_dim + 24, generator=gen)
    weight_shape = (2, head_dim) if two_row_weights else (head_dim,)
    q_norm_w = 1 + 0.3 * torch.randn(weight_shape, generator=gen)
    k_norm_w = 1 + 0.3 * torch.randn(weight_shape, generator=gen)
    if flux_rope:
        ids = torch.zeros(seq_len, 3)
        ids[txt_len:, 1] = torch.arange(seq_len - txt_len) // 10
        ids[txt_len:, 2] = torch.arange(seq_len - txt_len) % 10
        third = head_dim // 4
        cos, sin = rope_table(ids, (head_dim - 2 * third, third, third))
    else:
        angles = 2 * torch.pi * torch.rand(seq_len, head_dim, generator=gen)
        cos, sin = angles.cos(), angles.sin()
    tensors = [t.to(device, dtype) for t in (projection, q_norm_w, k_norm_w)]
    q, k, v = tensors[0][..., : 3 * heads * head_dim].unflatten(-1, (3, heads, head_dim)).unbind(2)
    return q, k, v, tensors[1], tensors[2], cos.to(device), sin.to(device)


def upcast(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() for t in inputs)


# ---- the Triton kernel against the reference -------------------------------------------------------

# (batch, seq_len, heads, head_dim, txt_len, two_row_weights, k_prologue)
TRITON_CASES = [
    (1, SEQ_LEN, 1, 16, TXT_LEN, True, "prepass"),
    (2, SEQ_LEN, 2, 64, TXT_LEN, True, "prepass"),
    (1, SEQ_LEN, 3, 64, 0, False, "prepass"),
    (2, SEQ_LEN, 3, 16, 0, True, "prepass"),
    (2, SEQ_LEN, 2, 16, TXT_LEN, True, "fused"),
    (1, 45, 1, 64, 13, False, "fused"),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "B{}-L{}-H{}-D{}-txt{}-w{}-{}".format(*c))
def test_triton_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    batch, seq_len, heads, head_dim, txt_len, two_rows, k_prologue = case
    inputs = make_inputs(batch, seq_len, heads, head_dim, dtype, two_rows)
    assert inputs[0].stride(1) != 3 * heads * head_dim and not inputs[0].is_contiguous()

    out = fused_attention_triton(*inputs, txt_len, EPS, k_prologue=k_prologue)

    assert out.shape == (batch, seq_len, heads * head_dim)
    assert out.dtype == dtype and out.is_contiguous()
    assert_matches_reference(out, fused_attention_ref(*upcast(inputs), txt_len, EPS))


@needs_triton
def test_triton_k_prologues_agree() -> None:
    """Pre-pass and in-loop k normalisation round k the same way, so they agree to fp32 rounding."""
    inputs = make_inputs(1, 70, 2, 16, torch.float16, flux_rope=True, txt_len=30)
    prepass = fused_attention_triton(*inputs, 30, EPS, k_prologue="prepass")
    fused = fused_attention_triton(*inputs, 30, EPS, k_prologue="fused")
    torch.testing.assert_close(prepass, fused, atol=1e-3, rtol=1e-3)


@needs_triton
@pytest.mark.gpu(reason="bf16 needs a GPU: the Triton interpreter's bf16 tl.dot is wrong")
def test_triton_bf16_on_gpu() -> None:
    inputs = make_inputs(2, SEQ_LEN, 2, 128, torch.bfloat16)
    out = fused_attention_triton(*inputs, TXT_LEN, EPS)
    assert_matches_reference(out, fused_attention_ref(*upcast(inputs), TXT_LEN, EPS))


@needs_triton
def test_triton_rejects_unsupported_head_dim() -> None:
    with pytest.raises(ValueError, match=r"D must be one of \(16, 32, 64, 128\), got 24"):
        fused_attention_triton(*make_inputs(1, 8, 1, 24), 0, EPS)


# ---- the reference against the model's own formulation ----------------------------------------------


def model_attention(q, k, v, q_norm_w, k_norm_w, cos, sin, txt_len: int, eps: float) -> torch.Tensor:
    """What ``DoubleStreamBlock``/``SingleStreamBlock`` do: per-stream RMSNorm, RoPE, SDPA, merge heads."""
    head_dim = q.shape[-1]

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 1:
            return F.rms_norm(x, (head_dim,), weight, eps)
        txt = F.rms_norm(x[:, :txt_len], (head_dim,), weight[0], eps)
        img = F.rms_norm(x[:, txt_len:], (head_dim,), weight[1], eps)
        return torch.cat([txt, img], dim=1)

    queries = apply_rope(norm(q, q_norm_w), cos, sin)
    keys = apply_rope(norm(k, k_norm_w), cos, sin)
    out = F.scaled_dot_product_attention(queries.transpose(1, 2), keys.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("flux_rope", [False, True], ids=["random-rope", "flux-rope"])
@pytest.mark.parametrize("two_rows", [True, False], ids=["w2xD", "wD"])
@pytest.mark.parametrize("txt_len", [0, TXT_LEN, SEQ_LEN])
def test_reference_matches_model_formulation(txt_len: int, two_rows: bool, flux_rope: bool) -> None:
    inputs = make_inputs(
        2, SEQ_LEN, 3, 32, two_row_weights=two_rows, flux_rope=flux_rope, txt_len=txt_len, device="cpu"
    )
    torch.testing.assert_close(
        fused_attention_ref(*inputs, txt_len, EPS),
        model_attention(*inputs, txt_len, EPS),
        atol=1e-5,
        rtol=1e-5,
    )


def test_reference_keeps_input_dtype() -> None:
    inputs = make_inputs(1, 20, 2, 16, torch.bfloat16, device="cpu")
    out = fused_attention_ref(*inputs, 5, EPS)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 20, 32)


# ---- validation --------------------------------------------------------------------------------------


def _replace(inputs: tuple, index: int, value) -> tuple:
    return tuple(value if i == index else t for i, t in enumerate(inputs))


@pytest.mark.parametrize(
    ("index", "make_bad", "message"),
    [
        (0, lambda t: t[0], r"q must be \[B, L, H, D\]"),
        (1, lambda t: t[:, :, :1], r"k must have q's shape"),
        (2, lambda t: t.double(), r"v dtype must be one of"),
        (
            2,
            lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
            r"v must be contiguous in its last dim",
        ),
        (3, lambda t: t[:, :8], r"q_norm_w must be \[D\] or \[2, D\] with D=16"),
        (4, lambda t: torch.stack([t[0], t[0], t[1]]), r"k_norm_w must be \[D\] or \[2, D\]"),
        (5, lambda t: t.double(), r"cos must be float32"),
        (6, lambda t: t[:-1], r"sin must be \[L, D\] = \[20, 16\]"),
    ],
)
def test_invalid_inputs_raise(index: int, make_bad, message: str) -> None:
    inputs = make_inputs(1, 20, 2, 16, device="cpu")
    bad = _replace(inputs, index, make_bad(inputs[index]))
    with pytest.raises(ValueError, match=message):
        fused_attention(*bad, 5, EPS)


def test_invalid_txt_len_raises() -> None:
    with pytest.raises(ValueError, match=r"txt_len must be in \[0, L=20\], got 21"):
        fused_attention(*make_inputs(1, 20, 2, 16, device="cpu"), 21, EPS)


# ---- the registered op -------------------------------------------------------------------------------


@pytest.mark.parametrize("two_rows", [True, False], ids=["w2xD", "wD"])
def test_opcheck(two_rows: bool) -> None:
    inputs = make_inputs(2, 21, 2, 16, two_row_weights=two_rows, device="cpu")
    torch.library.opcheck(torch.ops.fluxfill.fused_attention.default, (*inputs, 7, EPS))


def test_op_on_cpu_is_the_reference() -> None:
    inputs = make_inputs(1, 21, 2, 16, device="cpu")
    torch.testing.assert_close(
        torch.ops.fluxfill.fused_attention(*inputs, 7, EPS), fused_attention_ref(*inputs, 7, EPS)
    )


def test_compile_fullgraph_matches_eager() -> None:
    inputs = make_inputs(1, 21, 2, 16, device="cpu")

    def attend_and_project(q, k, v, q_norm_w, k_norm_w, cos, sin):
        out = torch.ops.fluxfill.fused_attention(q, k, v, q_norm_w, k_norm_w, cos, sin, 7, EPS)
        return out * 2 + 1

    compiled = torch.compile(attend_and_project, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), attend_and_project(*inputs))
