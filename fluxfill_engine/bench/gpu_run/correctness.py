"""Part 2, ``correctness``: the Triton kernels at FLUX shapes against their fp32 references and the
tolerance table, the native quantized linears against an fp64 matmul, the native library (built in
the background from the run's start, see :class:`.background.NativeBuild`) against the references,
and the kernel test files on the device (a background job of this part)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ...metrics import sqnr_db
from ..measure import tree_environment
from .background import Background, kernel_tests_command, kernel_tests_result
from .budget import Deadline, skipped
from .record import Run

EPS = 1e-6  # FLUX's QK RMSNorm epsilon
# Per-forward SQNR bounds of the quantized linears (the same as tests/optimizations/test_quantization.py's).
LINEAR_SQNR_BOUND_DB = {"fp8": 25.0, "fp8-weight": 25.0, "int8": 25.0, "int8-weight": 35.0}


def attention_inputs(run: Run, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """q, k, v as strided views of one fused projection (as the model hands them over), FLUX's two-row
    norm weights and RoPE table, at the profile's FLUX shape."""
    from ...layers import rope_table
    from ...testing.step_inputs import flux_ids

    profile, device = run.profile, run.device
    heads, dim, txt = profile.kernel_heads, profile.kernel_head_dim, profile.kernel_text_tokens
    rows, cols = profile.kernel_grid
    seq = txt + rows * cols
    generator = torch.Generator(device=device).manual_seed(seed)
    projection = torch.randn(1, seq, 3 * heads * dim + 64, device=device, generator=generator).to(dtype)
    q, k, v = projection[..., : 3 * heads * dim].unflatten(-1, (3, heads, dim)).unbind(2)
    weights = [(1 + 0.3 * torch.randn(2, dim, device=device, generator=generator)).to(dtype) for _ in "qk"]
    txt_ids, img_ids = flux_ids(txt, (rows, cols), device)
    # FLUX splits the head dim over (text, row, col) as 16/56/56 at 128; any other size as 1/2, 1/4, 1/4.
    axes = (16, 56, 56) if dim == 128 else (dim // 2, dim // 4, dim // 4)
    cos, sin = rope_table(torch.cat([txt_ids, img_ids]), axes)
    return {"q": q, "k": k, "v": v, "q_w": weights[0], "k_w": weights[1], "cos": cos, "sin": sin, "txt": txt}


def against_reference(output: torch.Tensor, reference: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """Errors of ``output`` against the fp32 ``reference``, and whether it is within ``atol = rtol =
    tolerance`` everywhere with no NaN (the tolerance table's test)."""
    out, ref = output.float(), reference.float()
    error = (out - ref).abs()
    return {
        "max_abs_error": float(error.max()),
        "rel_l2_error": float(error.norm() / ref.norm().clamp_min(1e-30)),
        "all_finite": bool(torch.isfinite(out).all()),
        "within_tolerance": bool(
            torch.isfinite(out).all() and torch.allclose(out, ref, atol=tolerance, rtol=tolerance)
        ),
        "tolerance": tolerance,
    }


def poison_allocator(shape: Sequence[int], dtype: torch.dtype, device: torch.device, blocks: int = 2) -> None:
    """Leave NaN-filled blocks of the output's size in the caching allocator, so a kernel that skips
    elements of its (``torch.empty``) outputs shows NaN instead of stale values (best effort: two
    blocks, as a launcher may allocate a scratch tensor of the same size first)."""
    if device.type == "cuda":
        poisoned = [torch.full(tuple(shape), float("nan"), dtype=dtype, device=device) for _ in range(blocks)]
        del poisoned


def check_fused_attention(
    run: Run, dtype: torch.dtype, k_prologue: Literal["prepass", "fused"]
) -> dict[str, Any]:
    from fluxfill_kernels.fused_attention import fused_attention_ref, fused_attention_triton
    from fluxfill_kernels.tolerances import TOLERANCE

    x = attention_inputs(run, dtype, seed=1)
    args = (x["q"], x["k"], x["v"], x["q_w"], x["k_w"], x["cos"], x["sin"])
    reference = fused_attention_ref(*(t.float() for t in args), txt_len=x["txt"], eps=EPS)
    poison_allocator(reference.shape, dtype, run.device)
    output = fused_attention_triton(*args, x["txt"], EPS, k_prologue=k_prologue)
    return {"shape": list(x["q"].shape), **against_reference(output, reference, TOLERANCE[dtype])}


def check_qk_norm_rope(run: Run, dtype: torch.dtype, native: bool = False) -> dict[str, Any]:
    from fluxfill_kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton
    from fluxfill_kernels.tolerances import TOLERANCE

    x = attention_inputs(run, dtype, seed=2)
    args = (x["q"], x["k"], x["q_w"], x["k_w"], x["cos"], x["sin"])
    q_ref, k_ref = qk_norm_rope_ref(*(t.float() for t in args), txt_len=x["txt"], eps=EPS)
    poison_allocator(q_ref.shape, dtype, run.device)
    kernel = torch.ops.fluxfill_native.qk_norm_rope if native else qk_norm_rope_triton
    q_out, k_out = kernel(*args, x["txt"], EPS)
    q_check, k_check = (
        against_reference(q_out, q_ref, TOLERANCE[dtype]),
        against_reference(k_out, k_ref, TOLERANCE[dtype]),
    )
    worst = max((q_check, k_check), key=lambda c: c["max_abs_error"])
    return {
        "shape": list(x["q"].shape),
        **worst,
        "within_tolerance": q_check["within_tolerance"] and k_check["within_tolerance"],
        "q": q_check,
        "k": k_check,
    }


def check_fill_cond(run: Run, dtype: torch.dtype, native: bool = False) -> dict[str, Any]:
    """Pure data movement: must equal the reference bit for bit (and so the fp32 one within any
    tolerance)."""
    from fluxfill_kernels.fill_cond import fill_cond_ref, fill_cond_triton
    from fluxfill_kernels.tolerances import TOLERANCE

    rows, cols = run.profile.kernel_grid
    generator = torch.Generator(device=run.device).manual_seed(3)
    latents = torch.randn(1, 16, 2 * rows, 2 * cols, device=run.device, generator=generator).to(dtype)
    mask = (torch.rand(1, 1, 16 * rows, 16 * cols, device=run.device, generator=generator) > 0.5).to(dtype)
    reference = fill_cond_ref(latents.float(), mask.float(), 8)
    poison_allocator(reference.shape, dtype, run.device)
    kernel = torch.ops.fluxfill_native.fill_cond if native else fill_cond_triton
    output = kernel(latents, mask, 8)
    same_dtype = fill_cond_ref(latents, mask, 8)
    return {
        "shape": list(output.shape),
        **against_reference(output, reference, TOLERANCE[dtype]),
        "bitwise_equal": bool(torch.equal(output, same_dtype)),
    }


def check_linear(run: Run, mode: str, rows: int, in_features: int, out_features: int) -> dict[str, Any]:
    """A native quantized linear (and plain bf16 for scale) against an fp64 matmul: SQNR in dB."""
    from torch import nn

    from ...quantization import quantize_linear, resolve

    try:
        plan = resolve(mode, "native", run.device)
    except ValueError as error:
        return skipped(str(error))
    device, dtype = run.device, run.profile.dtype
    generator = torch.Generator(device=device).manual_seed(4)
    linear = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    linear.weight.normal_(0.0, in_features**-0.5, generator=generator)
    linear.bias.normal_(0.0, 0.1, generator=generator)
    x = torch.randn(rows, in_features, device=device, generator=generator).to(dtype)
    exact = torch.addmm(linear.bias.double(), x.double(), linear.weight.double().t())
    output = quantize_linear(linear, plan)(x)
    sqnr = sqnr_db(exact, output)
    bound = LINEAR_SQNR_BOUND_DB[mode]
    return {
        "shape": [rows, in_features, out_features],
        "plan": dataclasses.asdict(plan),
        "sqnr_db": sqnr,
        "unquantized_sqnr_db": sqnr_db(exact, linear(x)),
        "bound_db": bound,
        "within_bound": sqnr is not None and sqnr >= bound and bool(torch.isfinite(output).all()),
    }


def check_native(run: Run) -> dict[str, Any]:
    """Hold the library the orchestrator built (``record["native_build"]``) to the references on the
    run's device; a build that failed or did not finish is this row's outcome."""
    from fluxfill_kernels import native

    build = run.record.get("native_build") or skipped("not built (the orchestrator builds it first)")
    built = {key: build[key] for key in ("build_s", "generator", "exit_code") if key in build}
    if build.get("status") != "ok":
        return {**built, **{k: v for k, v in build.items() if k in ("status", "reason", "error")}}
    built["cuda_kernels"] = build.get("cuda_kernels")
    try:
        torch.ops.fluxfill_native.fill_cond  # noqa: B018
        # A library loaded earlier in this process owns the namespace; a second cannot load.
        built["note"] = "fluxfill_native was already loaded (the package's _C.so): checked that library"
    except (AttributeError, RuntimeError):
        if not native.load(Path(build["library"])):
            return {
                **built,
                "status": "failed",
                "error": {"type": "LoadError", "message": "native.load refused"},
            }
    kind = run.device.type
    checks: dict[str, Any] = {}
    for op, check in (("qk_norm_rope", check_qk_norm_rope), ("fill_cond", check_fill_cond)):
        if not native.available(op, kind):
            checks[op] = skipped(f"the library has no {kind} kernel for {op} (CMake found no nvcc?)")
            continue
        for name in run.profile.native_dtypes:
            checks[f"{op}/{name}"] = check(run, getattr(torch, name), native=True)
    passed = [c.get("within_tolerance") for c in checks.values() if c.get("status") != "skipped"]
    return {**built, "checks": checks, "within_tolerance": bool(passed) and all(passed)}


def part_correctness(run: Run, deadline: Deadline, record: dict[str, Any]) -> None:
    # The kernel tests (their own processes) run in the background while this process checks the
    # kernels and linears; nothing here is timed, so sharing the GPU is fine. They are stopped before
    # the part ends, so they never disturb the timings of later parts.
    env = tree_environment()
    tests = Background("kernel tests", run.out_dir / "tests-gpu.txt")
    tests_command = kernel_tests_command(run)
    if tests_command is None:
        tests.reason = "no kernel test files in this tree"
    elif deadline.fits(30.0):
        tests.start(tests_command, env)
    else:
        tests.reason = f"needs about 30 s; {deadline.left():.0f} s of the part left"
    # If this worker is killed, the orchestrator ends this group (a stopped worker stops it itself).
    record["background_pids"] = [tests.process.pid] if tests.process is not None else []
    try:
        for name in ("bfloat16", "float16"):
            dtype = getattr(torch, name)
            if name not in run.profile.triton_dtypes:
                reason = "GPU only: the Triton interpreter's bf16 tl.dot is wrong"
                for op in ("fused_attention/prepass", "fused_attention/fused", "qk_norm_rope", "fill_cond"):
                    record["items"][f"{op}/{name}"] = skipped(reason)
                continue
            for prologue in ("prepass", "fused"):
                run.item(
                    record,
                    f"fused_attention/{prologue}/{name}",
                    functools.partial(check_fused_attention, run, dtype, prologue),
                )
            run.item(record, f"qk_norm_rope/{name}", functools.partial(check_qk_norm_rope, run, dtype))
            run.item(record, f"fill_cond/{name}", functools.partial(check_fill_cond, run, dtype))
        for mode in ("fp8", "int8", "fp8-weight", "int8-weight"):
            for shape in run.profile.linear_shapes:
                key = "linear/{}/{}x{}x{}".format(mode, *shape)
                run.item(record, key, functools.partial(check_linear, run, mode, *shape))
        run.item(record, "native", lambda: check_native(run))
        run.item(
            record,
            "kernel_tests",
            lambda: kernel_tests_result(run, tests, deadline.within(deadline.left() - 3.0)),
        )
    finally:
        tests.stop()
