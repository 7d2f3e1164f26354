"""The optional native kernel library: ``kernels/csrc`` built by CMake into ``fluxfill_kernels/_C*.so``.

It defines ops in the ``fluxfill_native`` namespace (``fill_cond``, ``qk_norm_rope``) with C++ CPU
kernels, and CUDA kernels when torch has CUDA. The ``fluxfill`` ops call them when the library is
loaded (preferred on CPU), so a deployment that must not JIT-compile Triton still gets fused kernels.
The package works without it. ``FLUXFILL_NATIVE=0`` disables loading.

On CUDA the ``fluxfill`` ops run Triton unless ``FLUXFILL_CUDA_KERNELS=native`` (or triton is not
installed) and the library has a CUDA kernel for the op: that is the cold-start deployment, which must
not JIT-compile Triton.

The build writes a stamp beside the library (``_C.json`` for ``_C.so``): the torch version and C++11 ABI
it was compiled against, whether it has CUDA kernels, and the library's sha256. libtorch has no stable
C++ ABI, so a library built for another torch must never be loaded: :func:`load` reads the stamp first
and refuses a library without one, with another torch or ABI, or that is not the file the stamp
describes. It then logs one warning saying how to rebuild, and the ``fluxfill`` ops run their pure-torch
references; :func:`unavailable_reason` tells why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

STAMP_FORMAT = 1  # the "format" field CMakeLists.txt writes; another value is a stamp this loader cannot read

# The build commands of docs/optimizations.md, quoted in the warning of a refused library.
REBUILD_COMMANDS = (
    "    cmake -S . -B build-native "
    "-DCMAKE_PREFIX_PATH=\"$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')\"\n"
    "    cmake --build build-native -j"
)


@dataclass
class _State:
    """What :func:`load` decided for this process (tests swap in a fresh one to start over)."""

    loaded: bool | None = None  # None: no load tried yet
    path: Path | None = None  # the library loaded
    reason: str | None = None  # why no library is loaded
    warned: set[str] = field(default_factory=set)  # the warnings already logged


_state = _State()
_lock = threading.Lock()  # the first op calls may come from several threads at once


def library_path() -> Path | None:
    """The built library inside the package folder, if any."""
    candidates = sorted(Path(__file__).parent.glob("_C*.so"))
    return candidates[0] if candidates else None


def stamp_path(library: str | Path) -> Path:
    """Where the build stamp of ``library`` lies: beside it, ``.so`` replaced by ``.json``."""
    return Path(library).with_suffix(".json")


def running_torch() -> dict[str, str | bool]:
    """The stamp fields a library must match to be loaded into this process."""
    return {"torch_version": str(torch.__version__), "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}


def _describe(build: dict) -> str:
    return f"torch {build['torch_version']} (_GLIBCXX_USE_CXX11_ABI={int(build['cxx11_abi'])})"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_stamp(library: str | Path) -> str | None:
    """Why ``library`` must not be loaded into this process according to its build stamp, or ``None``
    when the stamp matches the running torch and describes this very file."""
    library = Path(library)
    stamp = stamp_path(library)
    if not library.is_file():
        return f"there is no library at {library}"
    if not stamp.is_file():
        return (
            f"{library} has no build stamp ({stamp.name} beside it), so the torch it was built for is "
            f"unknown; this process runs {_describe(running_torch())}"
        )
    try:
        data = json.loads(stamp.read_text())
        built = {"torch_version": data["torch_version"], "cxx11_abi": data["cxx11_abi"]}
        digest = data["library_sha256"]
        valid = data.get("format") == STAMP_FORMAT and isinstance(built["cxx11_abi"], bool)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"the build stamp {stamp} of {library} cannot be read ({type(error).__name__}: {error})"
    if not valid:
        return f"the build stamp {stamp} of {library} is not in the format this fluxfill_kernels reads"
    running = running_torch()
    if built != running:
        return f"{library} was built for {_describe(built)}, but this process runs {_describe(running)}"
    if _sha256(library) != digest:
        return (
            f"{library} is not the file its build stamp {stamp} was written for (their sha256 differ): "
            "the library was replaced after it was built"
        )
    return None


def _registered() -> bool:
    """Whether some library has registered the ``fluxfill_native`` ops in this process."""
    try:
        torch.ops.fluxfill_native.fill_cond  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _refuse(reason: str, warn: bool) -> bool:
    """Record that no library is loaded and why; with ``warn``, log why once."""
    _state.loaded, _state.path, _state.reason = False, None, reason
    if warn and reason not in _state.warned:
        _state.warned.add(reason)
        logger.warning(
            "fluxfill: not loading the native kernel library: %s. The fluxfill ops run their pure-torch "
            "references instead (slower on CPU). Rebuild the library for the running torch from the "
            "fluxfill-engine source folder:\n%s\nor set FLUXFILL_NATIVE=0 to stop loading it.",
            reason,
            REBUILD_COMMANDS,
        )
    return False


def load(path: str | Path | None = None) -> bool:
    """Load the library once (from ``path`` or the package folder); whether that library is loaded.

    A library whose build stamp is missing or names another torch version or C++ ABI is not loaded
    (see :func:`check_stamp`): one warning says why and how to rebuild, and the ops fall back to their
    references. A process holds one ``fluxfill_native`` library: once one is loaded, asking for another
    path returns ``False`` and leaves the loaded one in use.
    """
    with _lock:
        if path is None and _state.loaded is not None:
            return _state.loaded
        if _state.loaded:  # it stays loaded: a library cannot be unloaded
            assert _state.path is not None, "a loaded library records its path"
            return path is None or Path(path).resolve() == _state.path.resolve()
        if os.environ.get("FLUXFILL_NATIVE", "1") == "0":
            return _refuse("FLUXFILL_NATIVE=0 disables the native kernel library", warn=False)
        if path is None:
            path = library_path()
            if path is None:  # the usual case of an install without a build: nothing to warn about
                return _refuse(
                    f"no native kernel library was built (no _C*.so in {Path(__file__).parent})", False
                )
        path = Path(path)
        problem = check_stamp(path)
        if problem is not None:
            return _refuse(problem, warn=True)
        if _registered():  # loading a second library would abort the process (duplicate TORCH_LIBRARY)
            return _refuse(
                f"cannot load {path}: another library loaded outside fluxfill_kernels.native already "
                "registered the fluxfill_native ops in this process",
                warn=True,
            )
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as error:
            return _refuse(f"loading {path} failed ({type(error).__name__}: {error})", warn=True)
        _state.loaded, _state.path, _state.reason = True, path, None
        return True


def loaded_path() -> Path | None:
    """The library loaded into this process, if any (does not try to load one)."""
    return _state.path if _state.loaded else None


def unavailable_reason() -> str | None:
    """Why the native library is not in use (``None`` when it is loaded); tries to load it first."""
    if _state.loaded is None:
        load()
    return None if _state.loaded else _state.reason


def available(op: str, device_type: str = "cpu") -> bool:
    """Whether ``torch.ops.fluxfill_native.<op>`` has a kernel for ``device_type`` ("cpu" or "cuda")."""
    if _state.loaded is None:
        load()
    if not _state.loaded:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fluxfill_native::{op}", key)


def use_native_on_cuda(op: str) -> bool:
    """Whether the CUDA kernel of ``fluxfill::<op>`` should be the native one rather than Triton's."""
    wanted = os.environ.get("FLUXFILL_CUDA_KERNELS", "triton") == "native"
    no_triton = importlib.util.find_spec("triton") is None
    return (wanted or no_triton) and available(op, "cuda")
