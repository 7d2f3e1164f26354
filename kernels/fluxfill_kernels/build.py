"""The CMake commands that build the native library (``kernels/csrc`` -> ``_C.so`` and its stamp) for
the installed torch: used by the native library's tests and by the GPU run's background build."""

from __future__ import annotations

from pathlib import Path

import torch


def cuda_configure_args(env: dict[str, str]) -> list[str]:
    """CMake arguments (and ``env`` entries) that help torch's FindCUDA when torch has CUDA.

    torch's CMake config finds the toolkit from ``nvcc`` on PATH, which fails when that is a wrapper
    outside the toolkit (``/usr/local/bin/nvcc`` gives root ``/usr/local``); it also links nvrtc, which
    a toolkit assembled from pip wheels keeps only in the ``nvidia`` wheel folders. Building for this
    GPU's architecture alone keeps the build short.
    """
    if torch.version.cuda is None:
        return []
    from torch.utils import cpp_extension

    args = []
    roots = [cpp_extension.CUDA_HOME, "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]
    root = next((Path(r) for r in roots if r and (Path(r) / "include" / "cuda_runtime.h").is_file()), None)
    if root is not None:
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
        if not any(any((root / lib).glob("libnvrtc.so*")) for lib in ("lib64", "lib")):
            wheels = Path(torch.__file__).resolve().parents[1] / "nvidia"
            nvrtc = sorted(wheels.glob("*/lib/libnvrtc.so*"))
            if nvrtc:
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in env:
        env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
    return args


def cmake_commands(source: Path, folder: Path, cmake: str, env: dict[str, str], jobs: int) -> list[list[str]]:
    """Configure and build commands writing the library and its stamp into ``folder``; ``env`` (the
    environment the commands will run in) may gain entries."""
    configure = [
        cmake,
        "-S",
        str(source),
        "-B",
        str(folder),
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DFLUXFILL_NATIVE_OUTPUT_DIR={folder}",
        *cuda_configure_args(env),
    ]
    return [configure, [cmake, "--build", str(folder), "-j", str(jobs)]]
