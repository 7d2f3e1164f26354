"""Compile every Triton kernel for an H100/H200 (sm_90) without a GPU and report ptxas' resource figures.

Run by test_kernels_compile_for_hopper.py in a process without TRITON_INTERPRET (under the interpreter,
kernels cannot be compiled). Each kernel is compiled with the launch configuration its launcher picks at
FLUX's shapes (head dim 128, 24 heads, 4096 image + 512 text tokens, batch 1), then its PTX is assembled
again by the ptxas bundled with Triton, with ``-v``, for the register, spill and stack figures (Triton
keeps them only once a GPU loads the binary), and its SASS is disassembled for the matrix and local-memory
instructions it uses. One JSON line per kernel goes to stdout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from fluxfill_kernels import fill_cond, fused_attention, qk_norm_rope

HOPPER_CAPABILITY = 90
HOPPER = GPUTarget("cuda", HOPPER_CAPABILITY, 32)
SCALARS_FP32 = {"eps", "qk_scale"}
POINTERS_FP32 = {
    "cos_ptr",
    "sin_ptr",
    "q_w_ptr",
    "k_w_ptr",
    "w_ptr",
    "qw_ptr",
    "kw_ptr",
    "mask_ptr",
    "v_scale_ptr",
}
SHARED_MEMORY_PER_BLOCK = 227 * 1024
HEAD_DIM, HEADS, SEQ_LEN, BATCH = 128, 24, 4096 + 512, 1

_FIGURES = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_figures(ptx: str) -> dict[str, int]:
    """Registers, spill stores/loads and stack frame bytes per thread that ptxas reports for ``ptx``."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [
            get_ptxas(HOPPER_CAPABILITY).path,
            "-v",
            f"--gpu-name={sm_arch_from_capability(HOPPER_CAPABILITY)}",
            str(source),
            "-o",
            str(Path(folder) / "kernel.cubin"),
        ]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    figures = {}
    for name, pattern in _FIGURES.items():
        found = pattern.search(log)
        if found is None:
            raise RuntimeError(f"ptxas -v printed no {name}: {log}")
        figures[name] = int(found.group(1))
    return figures


_SASS_OPS = re.compile(r"\b(HGMMA|QGMMA|HMMA|LDL|STL)\b")


def sass_op_counts(cubin: bytes) -> dict[str, int]:
    """How often the cubin's SASS uses warpgroup MMA (HGMMA; QGMMA for fp8), the older warp MMA (HMMA)
    and local-memory loads and stores (LDL/STL), from the nvdisasm bundled with Triton."""
    nvdisasm = Path(get_ptxas(HOPPER_CAPABILITY).path).with_name("nvdisasm")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(nvdisasm), str(path)], capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = dict.fromkeys(("HGMMA", "QGMMA", "HMMA", "LDL", "STL"), 0)
    for op in _SASS_OPS.findall(sass):
        counts[op] += 1
    return counts


def compile_for_hopper(
    kernel,
    dtype: str,
    constexprs: dict,
    num_warps: int,
    num_stages: int,
    ctas: int,
    label: str = "",
    fp8_pointers: frozenset[str] = frozenset(),
) -> dict:
    """Compile ``kernel`` for sm_90 and return its figures (``ctas``: programs launched at FLUX shapes;
    ``fp8_pointers``: pointer arguments to float8 e4m3 data)."""
    names = [param.name for param in kernel.params]
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in fp8_pointers:
            signature[name] = "*fp8e4nv"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in POINTERS_FP32 else f"*{dtype}"
        else:
            signature[name] = "fp32" if name in SCALARS_FP32 else "i32"
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=HOPPER, options=options)
    assert compiled.asm["cubin"], kernel.fn.__name__
    record = {
        "kernel": kernel.fn.__name__ + (f"[{label}]" if label else ""),
        "dtype": dtype,
        "num_warps": num_warps,
        "num_stages": num_stages,
        "ctas": ctas,
        "shared_bytes": compiled.metadata.shared,
        "shared_limit": SHARED_MEMORY_PER_BLOCK,
    }
    record |= ptxas_figures(compiled.asm["ptx"])
    record["sass"] = sass_op_counts(compiled.asm["cubin"])
    print(json.dumps(record), flush=True)
    return record


def main(dtype: str) -> None:
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for label, in_loop, fp8 in (("prepass", False, False), ("fused-k", True, False), ("fp8", False, True)):
        config = fused_attention._attention_config(HEAD_DIM, torch_dtype, interpreted=False, in_loop=in_loop)
        constexprs = {"D": HEAD_DIM, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
        constexprs |= {"NORM_ROPE_Q": in_loop, "NORM_ROPE_K": in_loop, "DOT_PRECISION": "tf32", "FP8": fp8}
        compile_for_hopper(
            fused_attention._fused_attention_kernel,
            dtype,
            constexprs,
            config["num_warps"],
            config["num_stages"],
            ctas=triton.cdiv(SEQ_LEN, config["BLOCK_M"]) * BATCH * HEADS,
            label=label,
            fp8_pointers=frozenset({"q_ptr", "k_ptr", "v_ptr"}) if fp8 else frozenset(),
        )
    prepass = fused_attention._PREPASS_CONFIG
    for fp8 in (False, True):
        compile_for_hopper(
            fused_attention._qk_prepass_kernel,
            dtype,
            {"D": HEAD_DIM, "BLOCK_L": prepass["BLOCK_L"], "FP8": fp8},
            prepass["num_warps"],
            prepass["num_stages"],
            ctas=triton.cdiv(SEQ_LEN, prepass["BLOCK_L"]) * HEADS * BATCH,
            label="fp8" if fp8 else "",
            fp8_pointers=frozenset({"q_out_ptr", "k_out_ptr", "v_out_ptr"} if fp8 else ()),
        )
    block_l, block_d = qk_norm_rope._block_sizes(SEQ_LEN, HEAD_DIM)
    compile_for_hopper(
        qk_norm_rope._qk_norm_rope_kernel,
        dtype,
        {"dim": HEAD_DIM, "BLOCK_L": block_l, "BLOCK_D": block_d},
        num_warps=4,
        num_stages=3,
        ctas=triton.cdiv(SEQ_LEN, block_l) * HEADS * BATCH,
    )
    # FLUX Fill at 1024x1024: 16 latent channels at 128x128, VAE scale 8.
    compile_for_hopper(
        fill_cond._fill_cond_kernel,
        dtype,
        {"s": 8, "BLOCK_N": fill_cond.BLOCK_N, "BLOCK_C": fill_cond.BLOCK_C},
        num_warps=4,
        num_stages=3,
        ctas=triton.cdiv(64 * 64, fill_cond.BLOCK_N) * triton.cdiv(4 * 16 + 4 * 64, fill_cond.BLOCK_C),
    )


if __name__ == "__main__":
    main(sys.argv[1])
