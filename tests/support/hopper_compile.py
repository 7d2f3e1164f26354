"""Compile every Triton kernel for an H100 (sm_90), without a GPU. Run by test_kernels_compile_for_hopper.py
in a process without TRITON_INTERPRET (under the interpreter, kernels cannot be compiled)."""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fluxfill_kernels import fill_cond, fused_attention, qk_norm_rope

HOPPER = GPUTarget("cuda", 90, 32)
SCALARS_FP32 = {"eps", "qk_scale"}
POINTERS_FP32 = {"cos_ptr", "sin_ptr", "q_w_ptr", "k_w_ptr", "w_ptr", "qw_ptr", "kw_ptr", "mask_ptr"}
SHARED_MEMORY_PER_BLOCK = 227 * 1024


def compile_for_hopper(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int = 3):
    names = [param.name for param in kernel.params]
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
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
    assert compiled.metadata.shared <= SHARED_MEMORY_PER_BLOCK, (kernel.fn.__name__, compiled.metadata.shared)
    print(kernel.fn.__name__, dtype, "shared bytes", compiled.metadata.shared)


def main(dtype: str) -> None:
    config = fused_attention._attention_config(128, torch.bfloat16, interpreted=False)
    constexprs = {"D": 128, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
    constexprs |= {"NORM_ROPE_K": False, "DOT_PRECISION": "tf32"}
    attention = fused_attention._fused_attention_kernel
    compile_for_hopper(attention, dtype, constexprs, config["num_warps"], config["num_stages"])
    compile_for_hopper(fused_attention._norm_rope_kernel, dtype, {"D": 128, "BLOCK_L": 64}, num_warps=4)
    qk_constexprs = {"dim": 128, "BLOCK_L": 16, "BLOCK_D": 128}
    compile_for_hopper(qk_norm_rope._qk_norm_rope_kernel, dtype, qk_constexprs, num_warps=4)
    compile_for_hopper(
        fill_cond._fill_cond_kernel, dtype, {"s": 8, "BLOCK_N": 32, "BLOCK_C": 64}, num_warps=4
    )


if __name__ == "__main__":
    main(sys.argv[1])
