"""The Triton kernels compile for an H100/H200 (sm_90) without a GPU, and none spills registers.

This runs the whole GPU compilation pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for the FLUX
shapes' constexprs and each launcher's own launch configuration, in bf16 and fp16, so a kernel that the
interpreter accepts but the GPU compiler rejects (layouts, shared memory, dtype rules) fails here, on CPU
CI, and so does one whose registers spill to local memory (ptxas' ``-v`` figures, printed per kernel) or
an attention kernel whose products miss Hopper's warpgroup MMA (its SASS).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ptxas compiles of every kernel in a subprocess

pytest.importorskip("triton")

KERNELS = {
    "_fused_attention_kernel[prepass]",
    "_fused_attention_kernel[fused-k]",
    "_fused_attention_kernel[fp8]",
    "_qk_prepass_kernel",
    "_qk_prepass_kernel[fp8]",
    "_qk_norm_rope_kernel",
    "_fill_cond_kernel",
}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_triton_kernels_compile_for_hopper_without_spills(dtype):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; fusion is its default
    root = Path(__file__).resolve().parents[2]
    script = root / "tests" / "support" / "hopper_compile.py"
    # The checkout's kernels, also in a venv that does not install the project (the version rehearsal).
    env["PYTHONPATH"] = os.pathsep.join([str(root / "kernels"), str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), dtype], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for record in records:
        print(record)
    assert {record["kernel"] for record in records} == KERNELS
    for record in records:
        assert record["shared_bytes"] <= record["shared_limit"], record
        assert record["spill_stores"] == 0 and record["spill_loads"] == 0, f"registers spill: {record}"
        assert record["stack_frame"] == 0, f"local-memory stack frame: {record}"
        assert record["sass"]["LDL"] == record["sass"]["STL"] == 0, f"local memory in SASS: {record}"
        if record["kernel"].startswith("_fused_attention_kernel"):
            # Hopper's warpgroup MMA (wgmma): QGMMA for fp8 operands, HGMMA for 16-bit ones.
            mma = "QGMMA" if record["kernel"].endswith("[fp8]") else "HGMMA"
            assert record["sass"][mma] > 0 and record["sass"]["HMMA"] == 0, f"not on wgmma: {record}"
