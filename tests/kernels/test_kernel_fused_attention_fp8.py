"""``fluxfill::fused_attention_fp8``: attention with q, k, v and the probabilities in float8 e4m3.

The bound: e4m3 keeps 3 mantissa bits, so rounding a value moves it by at most 2^-4 of itself, a noise
power of about (2^-4)^2 / 3 of the signal's: ~29 dB for one rounded operand. Four operands are rounded
(q, k, v, the probabilities), so the output's SQNR against the exact path is about 29 - 10 log10(4)
~ 23 dB; the tests hold it to 20 dB, and below 40 dB (it really is rounded). Without a GPU the Triton
fp8 kernel cannot run (the interpreter's fp8 dot is wrong): the CPU op is the reference that rounds the
same way, and the kernel is checked against it on a GPU and compiled for sm_90 offline
(test_kernels_compile_for_hopper.py).
"""

import math

import pytest
import torch

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.attention import JointQKV, make_attention
from fluxfill_engine.testing.tiny import tiny_components
from fluxfill_kernels._triton import HAS_TRITON
from fluxfill_kernels.fused_attention import (
    fused_attention_fp8_ref,
    fused_attention_ref,
    fused_attention_triton,
)
from tests.kernels.test_kernel_fused_attention import EPS, SEQ_LEN, TXT_LEN, make_inputs, upcast
from tests.support import helpers

ROUNDED_OPERANDS = 4
SQNR_ONE_ROUNDING_DB = 10 * math.log10(3 / 2**-8)  # uniform error within +-2^-4 relative
MIN_SQNR_DB = SQNR_ONE_ROUNDING_DB - 10 * math.log10(ROUNDED_OPERANDS) - 3  # margin for the inputs
MAX_SQNR_DB = 40.0

CASES = [  # (batch, seq_len, heads, head_dim, txt_len, flux_rope)
    (1, SEQ_LEN, 2, 128, TXT_LEN, True),
    (2, SEQ_LEN, 3, 64, 0, False),
    (1, 45, 1, 32, 13, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-L{}-H{}-D{}-txt{}-flux{}".format(*c))
def test_fp8_reference_within_the_rounding_bound(case: tuple) -> None:
    batch, seq_len, heads, head_dim, txt_len, flux_rope = case
    inputs = make_inputs(batch, seq_len, heads, head_dim, flux_rope=flux_rope, txt_len=txt_len, device="cpu")
    exact = fused_attention_ref(*inputs, txt_len, EPS)
    fp8 = fused_attention_fp8_ref(*inputs, txt_len, EPS)
    assert fp8.shape == exact.shape and fp8.dtype == exact.dtype
    assert MIN_SQNR_DB <= helpers.sqnr(exact, fp8) < MAX_SQNR_DB


def test_fp8_reference_keeps_large_values_in_range() -> None:
    """Large v and norm weights: the scales keep every operand below e4m3's 448 (no inf, no NaN), and
    v's per-head scale keeps its precision relative. (Large norm weights also sharpen the softmax, and
    the rounding error of the scores grows with them: there the bound does not hold, on any data.)"""
    q, k, v, q_w, k_w, cos, sin = make_inputs(1, 40, 2, 32, device="cpu")
    large_v = (q, k, v * 1e4, q_w, k_w, cos, sin)
    assert helpers.sqnr(
        fused_attention_ref(*large_v, 10, EPS), fused_attention_fp8_ref(*large_v, 10, EPS)
    ) >= (MIN_SQNR_DB)
    large_weights = (q, k, v * 1e4, q_w * 50, k_w * 50, cos, sin)
    assert torch.isfinite(fused_attention_fp8_ref(*large_weights, 10, EPS)).all()


def test_op_on_cpu_is_the_reference_and_passes_opcheck() -> None:
    inputs = make_inputs(1, 21, 2, 16, device="cpu")
    torch.testing.assert_close(
        torch.ops.fluxfill.fused_attention_fp8(*inputs, 7, EPS), fused_attention_fp8_ref(*inputs, 7, EPS)
    )
    torch.library.opcheck(torch.ops.fluxfill.fused_attention_fp8.default, (*inputs, 7, EPS))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("dtype", "k_prologue", "message"),
    [
        (torch.float32, "prepass", "fp8 takes float16 or bfloat16"),
        (torch.float16, "fused", "fp8 needs k_prologue='prepass'"),
    ],
)
def test_triton_fp8_refuses_what_it_cannot_run(dtype, k_prologue, message) -> None:
    inputs = make_inputs(1, 20, 1, 16, dtype)
    with pytest.raises(ValueError, match=message):
        fused_attention_triton(*inputs, 5, EPS, k_prologue=k_prologue, fp8=True)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.gpu(reason="the fp8 kernel needs fp8 tensor cores; the interpreter's fp8 dot is wrong")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_fp8_matches_the_fp8_reference_on_gpu(dtype) -> None:
    inputs = make_inputs(2, SEQ_LEN, 2, 128, dtype, flux_rope=True)
    out = fused_attention_triton(*inputs, TXT_LEN, EPS, fp8=True)
    fp8_ref = fused_attention_fp8_ref(*upcast(inputs), TXT_LEN, EPS)
    # The kernel rounds the probabilities against the running row max, the reference against the
    # final one: close, not equal.
    assert helpers.sqnr(fp8_ref, out.float()) >= 30
    assert helpers.sqnr(fused_attention_ref(*upcast(inputs), TXT_LEN, EPS), out.float()) >= MIN_SQNR_DB


def test_backend_fp8_within_the_bound() -> None:
    q, k, v, q_w, k_w, cos, sin = make_inputs(1, 60, 2, 32, device="cpu", txt_len=20)
    qkv = JointQKV(
        q=[q[:, :20], q[:, 20:]],
        k=[k[:, :20], k[:, 20:]],
        v=[v[:, :20], v[:, 20:]],
        q_norm=list(q_w),
        k_norm=list(k_w),
        eps=EPS,
    )
    exact = make_attention("triton", torch.device("cpu"))(qkv, (cos, sin))
    fp8 = make_attention("triton", torch.device("cpu"), fp8=True)(qkv, (cos, sin))
    assert MIN_SQNR_DB <= helpers.sqnr(exact, fp8) < MAX_SQNR_DB


def test_engine_option_validated_and_wired() -> None:
    with pytest.raises(ValueError, match="attention_fp8 runs on attention='triton', got attention='sdpa'"):
        EngineConfig(attention_fp8=True)
    with pytest.raises(TypeError, match="attention_fp8 must be a bool"):
        EngineConfig(attention="triton", attention_fp8=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp8 attention runs on the 'triton' attention backend"):
        make_attention("sdpa", torch.device("cpu"), fp8=True)
    pipe = FluxFillPipeline(**tiny_components(0))
    helpers.disable_progress(pipe)
    pipe.configure(EngineConfig(attention="triton", attention_fp8=True))
    assert pipe.engine_transformer().attention_choice[-1] is True
    images = pipe(**helpers.call_kwargs(num_inference_steps=2)).images
    assert torch.isfinite(torch.as_tensor(helpers.as_array(images))).all()
