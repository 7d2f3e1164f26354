"""The Triton kernels compile for an H100 (sm_90) without a GPU, with the ptxas bundled in triton.

This runs the whole GPU compilation pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for the FLUX
shapes' constexprs in bf16 and fp16, so a kernel that the interpreter accepts but the GPU compiler
rejects (layouts, shared memory, dtype rules) fails here, on CPU CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ptxas compiles of every kernel in a subprocess

pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_triton_kernels_compile_for_hopper(dtype):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "support" / "hopper_compile.py"
    done = subprocess.run([sys.executable, str(script), dtype], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("shared bytes") == 4
