"""The optional native kernel library (``CMakeLists.txt``, ``kernels/csrc``): build it with CMake, load it,
and hold its ops to their pure-torch definitions; and the loader's build stamp check.

``fill_cond`` must equal ``fluxfill_engine.conditioning.fill_conditioning`` bit for bit (it only moves data
and casts). ``qk_norm_rope`` must equal ``F.rms_norm`` in float32 + ``apply_rope`` + ``transpose(1, 2)``:
within 1e-5 in float32, and within the tolerance table of ``fluxfill_kernels.tolerances`` against the fp32
reference in half precision. The library is built once per test process (each xdist worker builds its
own) into a fresh temporary folder (one translation unit: about 10-15 s on two cores), and the tests load
that build, never a library lying in the package folder; they skip, saying why, only when there is no
CMake or no C++ compiler. CUDA kernels are compiled when torch has CUDA, and tested here when a GPU is
present. Copies of the build with an edited or missing stamp check that the loader refuses a library
built for another torch and that the ops then run their references.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fluxfill_engine.conditioning import fill_conditioning
from fluxfill_engine.layers import apply_rope
from fluxfill_kernels import native
from fluxfill_kernels.build import cmake_commands
from fluxfill_kernels.fill_cond import fill_cond_ref
from fluxfill_kernels.qk_norm_rope import qk_norm_rope_ref
from fluxfill_kernels.tolerances import assert_matches_reference

pytestmark = pytest.mark.slow  # a CMake build of the native library in a subprocess

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS = 1e-6


# ---- building and loading -------------------------------------------------------------------------


def _cmake() -> str | None:
    found = shutil.which("cmake")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "cmake"  # pip's cmake in a venv that is not activated
    return str(beside_python) if beside_python.exists() else None


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_registered = native._registered


# A process holds one fluxfill_native library (loading a second aborts it), and the first fluxfill op
# that any test of this process calls would load the package's own, possibly stale, in-place build
# (kernels/fluxfill_kernels/_C.so). Settle the loader's default decision as "nothing" when this module is
# collected, before any test runs, so that the fixture below loads the fresh build; until it does, the
# ops run their references, which the other kernel tests accept.
if native.loaded_path() is None and not _registered():
    native._state = native._State(
        loaded=False, reason="tests/kernels/test_native.py loads the library it builds"
    )


@dataclass
class Built:
    path: Path
    stamp: dict[str, Any]  # its build stamp
    cuda: bool  # whether the CUDA kernels were compiled (torch has CUDA and CMake found nvcc)


@pytest.fixture(scope="session")
def fresh_build(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Configure and build the library with CMake (Release) into a fresh temporary folder (once per
    process: under xdist each worker has its own temporary root, so workers never share a build)."""
    cmake, cxx = _cmake(), _cxx_compiler()
    if cmake is None:
        pytest.skip("cmake is not installed (pip install cmake): cannot build the native kernel library")
    if cxx is None:
        pytest.skip(
            "no C++ compiler (c++, g++, clang++ or $CXX) found: cannot build the native kernel library"
        )
    if os.environ.get("FLUXFILL_NATIVE", "1") == "0":
        pytest.skip("FLUXFILL_NATIVE=0 disables loading the native kernel library")
    build = tmp_path_factory.mktemp("build-native")
    env = dict(os.environ)
    commands = cmake_commands(ROOT, build, cmake, env, jobs=2)
    start = time.perf_counter()
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            pytest.fail(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
            )
    print(f"\nbuilt the native kernel library in {time.perf_counter() - start:.1f} s")  # visible with -s
    library, stamp = build / "_C.so", native.stamp_path(build / "_C.so")
    assert library.is_file(), f"the build wrote no {library}"
    assert stamp.is_file(), f"the build wrote no build stamp {stamp} beside {library}"
    data = json.loads(stamp.read_text())
    return Built(library, data, data["cuda_kernels"])


@pytest.fixture(scope="session")
def native_library(fresh_build: Built) -> Built:
    """The fresh build, loaded into this process through ``native.load`` (which checks its stamp)."""
    if native.loaded_path() != fresh_build.path:
        if _registered():
            holder = native.loaded_path() or "a library loaded outside fluxfill_kernels.native"
            pytest.fail(
                f"the fluxfill_native ops were registered in this process (by {holder}) before the fresh "
                f"build {fresh_build.path} could be loaded; these tests must check the fresh build"
            )
        assert native.load(fresh_build.path), native.unavailable_reason()
    return fresh_build


@pytest.fixture
def ops(native_library: Built, request: pytest.FixtureRequest):
    """``torch.ops.fluxfill_native``; skips a test parametrized on "cuda" when no CUDA kernels were built."""
    device = getattr(request.node, "callspec", None) and request.node.callspec.params.get("device")
    if device == "cuda" and not native_library.cuda:
        pytest.skip("torch has CUDA but the CUDA kernels were not built (CMake found no nvcc)")
    return torch.ops.fluxfill_native


def test_library_registers_the_ops(native_library: Built) -> None:
    for op in ("fill_cond", "qk_norm_rope"):
        assert native.available(op, "cpu")
        assert native.available(op, "cuda") == native_library.cuda
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fluxfill_native::{op}", "Meta")


# ---- the build stamp -------------------------------------------------------------------------------

REBUILD_HINTS = ("cmake -S . -B build-native", "cmake --build build-native", "FLUXFILL_NATIVE=0")


@pytest.fixture
def undecided(monkeypatch: pytest.MonkeyPatch) -> native._State:
    """A loader that has decided nothing yet; this process's decision comes back after the test."""
    state = native._State()
    monkeypatch.setattr(native, "_state", state)
    return state


def _copy_build(built: Built, folder: Path, stamp: dict[str, Any] | str | None) -> Path:
    """``built``'s library copied into ``folder``, beside ``stamp`` (a dict as JSON, a str as is, or none)."""
    library = folder / "_C.so"
    shutil.copyfile(built.path, library)
    if isinstance(stamp, dict):
        native.stamp_path(library).write_text(json.dumps(stamp))
    elif isinstance(stamp, str):
        native.stamp_path(library).write_text(stamp)
    return library


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == native.__name__ and r.levelno == logging.WARNING
    ]


def _assert_ops_run_their_references() -> None:
    """The ``fluxfill`` CPU ops give their references' results without calling ``fluxfill_native``."""

    def refused(*args: Any) -> None:
        raise AssertionError("a fluxfill op called the refused native library")

    gen = torch.Generator().manual_seed(11)
    latents, mask = torch.randn(1, 16, 4, 6, generator=gen), torch.rand(1, 1, 32, 48, generator=gen)
    q, k = _fused_qk(1, 21, 16, torch.float32, gen)
    w = _norm_weight("[2, D]", 16, torch.float32, gen)
    cos, sin = _rope_table(21, 16, gen)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            torch.ops, "fluxfill_native", types.SimpleNamespace(fill_cond=refused, qk_norm_rope=refused)
        )
        fill = torch.ops.fluxfill.fill_cond(latents, mask, 8)
        q_out, k_out = torch.ops.fluxfill.qk_norm_rope(q, k, w, w[1], cos, sin, 5, EPS)
    assert torch.equal(fill, fill_cond_ref(latents, mask, 8))
    q_ref, k_ref = qk_norm_rope_ref(q, k, w, w[1], cos, sin, 5, EPS)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


def test_build_stamp_records_the_torch_it_was_built_for(fresh_build: Built) -> None:
    stamp = fresh_build.stamp
    assert stamp["torch_version"] == torch.__version__  # the full version, local part ("+cpu", "+cu128") too
    assert stamp["cxx11_abi"] is bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert stamp["torch_cuda_version"] == torch.version.cuda
    assert isinstance(stamp["cuda_kernels"], bool)
    assert (stamp["nvcc_version"] is not None) == stamp["cuda_kernels"]
    if torch.version.cuda is None:
        assert not stamp["cuda_kernels"]  # CUDA sources are compiled only when torch has CUDA
    assert native.check_stamp(fresh_build.path) is None


def test_library_with_matching_stamp_loads(native_library: Built) -> None:
    assert native.loaded_path() == native_library.path
    assert native.unavailable_reason() is None
    assert native.load(native_library.path)  # loading the loaded library again is a no-op
    assert native.load()  # and so is the default load, once a library is loaded
    assert native.available("fill_cond", "cpu") and native.available("qk_norm_rope", "cpu")


@pytest.mark.parametrize(
    ("field", "value"),
    [("torch_version", "2.5.1+cu121"), ("cxx11_abi", None)],  # None: the other ABI than the running torch's
    ids=["torch_version", "cxx11_abi"],
)
def test_library_built_for_another_torch_is_refused(
    fresh_build: Built,
    undecided: native._State,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    field: str,
    value: Any,
) -> None:
    value = (not torch._C._GLIBCXX_USE_CXX11_ABI) if field == "cxx11_abi" else value
    library = _copy_build(fresh_build, tmp_path, {**fresh_build.stamp, field: value})
    registered = _registered()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.load(library) is False
        assert native.load(library) is False  # asked again: still refused, and warned only once
    assert _registered() == registered  # nothing was loaded
    (message,) = _warnings(caplog)
    built = value if field == "torch_version" else torch.__version__
    abi = int(value if field == "cxx11_abi" else torch._C._GLIBCXX_USE_CXX11_ABI)
    running_abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert f"{library} was built for torch {built} (_GLIBCXX_USE_CXX11_ABI={abi})" in message
    assert f"this process runs torch {torch.__version__} (_GLIBCXX_USE_CXX11_ABI={running_abi})" in message
    assert all(hint in message for hint in REBUILD_HINTS), message
    assert native.unavailable_reason() is not None and "was built for torch" in native.unavailable_reason()
    assert not native.available("fill_cond", "cpu") and not native.available("qk_norm_rope", "cpu")
    _assert_ops_run_their_references()


@pytest.mark.parametrize(
    ("stamp", "match"),
    [
        (None, "has no build stamp (_C.json beside it)"),
        ("{not json", "cannot be read"),
        ({"format": 1}, "cannot be read"),
        ({"library_sha256": "0" * 64}, "is not the file its build stamp"),
        ({"format": 2}, "is not in the format"),
    ],
    ids=["missing", "not-json", "no-fields", "another-file", "another-format"],
)
def test_library_without_a_valid_stamp_is_refused(
    fresh_build: Built,
    undecided: native._State,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    stamp: dict[str, Any] | str | None,
    match: str,
) -> None:
    if isinstance(stamp, dict) and stamp != {"format": 1}:
        stamp = {**fresh_build.stamp, **stamp}
    library = _copy_build(fresh_build, tmp_path, stamp)
    registered = _registered()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.load(library) is False
    assert _registered() == registered
    (message,) = _warnings(caplog)
    assert str(library) in message and match in message, message
    assert all(hint in message for hint in REBUILD_HINTS), message
    assert match in native.unavailable_reason()
    _assert_ops_run_their_references()


def test_disabled_or_absent_library_is_not_a_warning(
    undecided: native._State, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``FLUXFILL_NATIVE=0`` and an install without a build are normal: the ops quietly use the references."""
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        monkeypatch.setenv("FLUXFILL_NATIVE", "0")
        assert native.load() is False
        assert "FLUXFILL_NATIVE=0" in native.unavailable_reason()
        monkeypatch.delenv("FLUXFILL_NATIVE")
        monkeypatch.setattr(native, "_state", native._State())
        monkeypatch.setattr(native, "library_path", lambda: None)
        assert not native.available("fill_cond", "cpu")
        assert native.unavailable_reason().startswith("no native kernel library was built")
    assert _warnings(caplog) == []


# ---- fill_cond ------------------------------------------------------------------------------------

FILL_SHAPES = [  # (C, h, w, s)
    (16, 6, 10, 8),  # FLUX Fill's channel counts
    (16, 32, 48, 8),  # several parallel chunks
    (3, 2, 4, 2),
    (5, 4, 2, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", FILL_SHAPES, ids=lambda s: "C{}_h{}_w{}_s{}".format(*s))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_dtype", ["float32", "same"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_fill_cond_is_bitwise_fill_conditioning(
    ops, device: str, shape, batch: int, dtype: torch.dtype, mask_dtype: str, contiguous: bool
) -> None:
    channels, h, w, s = shape
    gen = torch.Generator().manual_seed(channels * 1000 + h * 10 + w + batch)
    mask_dt = torch.float32 if mask_dtype == "float32" else dtype
    if contiguous:
        latents = torch.randn(batch, channels, h, w, generator=gen).to(dtype)
        mask = torch.rand(batch, 1, h * s, w * s, generator=gen).to(mask_dt)
    else:  # every other channel of a wider tensor; the mask as one channel of two, transposed storage
        latents = torch.randn(batch, 2 * channels, h, w, generator=gen).to(dtype)[:, ::2]
        mask = torch.rand(batch, 2, w * s, h * s, generator=gen).to(mask_dt).transpose(2, 3)[:, 1:]
    latents, mask = latents.to(device), mask.to(device)
    out = ops.fill_cond(latents, mask, s)
    expected = fill_conditioning(latents, mask, s)
    assert out.dtype == dtype and out.is_contiguous()
    assert out.shape == (batch, (h // 2) * (w // 2), 4 * channels + 4 * s * s)
    assert torch.equal(out, expected)


def test_fill_cond_binary_mask(ops) -> None:
    latents = torch.randn(1, 16, 4, 6, dtype=torch.bfloat16)
    mask = (torch.rand(1, 1, 32, 48) > 0.5).float()
    assert torch.equal(ops.fill_cond(latents, mask, 8), fill_conditioning(latents, mask, 8))


@pytest.mark.parametrize(
    ("latents_shape", "mask_shape", "s", "match"),
    [
        ((1, 16, 4, 6), (1, 1, 32, 40), 8, "mask must be"),
        ((1, 16, 4, 6), (2, 1, 32, 48), 8, "mask must be"),
        ((1, 16, 4, 6), (1, 2, 32, 48), 8, "mask must be"),
        ((1, 16, 3, 6), (1, 1, 24, 48), 8, "even"),
        ((16, 4, 6), (1, 1, 32, 48), 8, "masked_image_latents must be"),
        ((1, 16, 4, 6), (1, 1, 4, 6), 0, "vae_scale_factor"),
    ],
)
def test_fill_cond_rejects_bad_shapes(ops, latents_shape, mask_shape, s: int, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        ops.fill_cond(torch.randn(latents_shape), torch.rand(mask_shape), s)


def test_fill_cond_rejects_integer_mask(ops) -> None:
    with pytest.raises(RuntimeError, match="mask must be floating point"):
        ops.fill_cond(torch.randn(1, 4, 2, 2), torch.ones(1, 1, 4, 4, dtype=torch.int64), 2)


# ---- qk_norm_rope ---------------------------------------------------------------------------------

TXT, IMG, HEADS = 77, 100, 3


def _rope_table(seq: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An interleaved table like FLUX's: each angle repeated for its pair."""
    angles = torch.rand(seq, dim // 2, generator=gen, dtype=torch.float64) * 20
    return angles.cos().repeat_interleave(2, -1).float(), angles.sin().repeat_interleave(2, -1).float()


def _fused_qk(batch: int, seq: int, dim: int, dtype: torch.dtype, gen: torch.Generator):
    """q, k as the strided views of a fused QKV projection's output ``[B, L, 3*H*D]``."""
    hidden = torch.randn(batch, seq, 24, generator=gen)
    weight = torch.randn(3 * HEADS * dim, 24, generator=gen) / 3
    qkv = F.linear(hidden, weight).to(dtype).view(batch, seq, 3, HEADS, dim)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    assert not q.is_contiguous() and q.stride(-1) == 1
    return q, k


def _norm_weight(layout: str, dim: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    shape = (dim,) if layout == "[D]" else (2, dim)
    return (1 + 0.5 * torch.randn(shape, generator=gen)).to(dtype)


def qk_norm_rope_reference(
    x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, txt_len: int
) -> torch.Tensor:
    """float32 ``[B, H, L, D]``: ``F.rms_norm`` (row 0 of a ``[2, D]`` weight for text tokens) + rope."""
    x, w = x.float(), w.float()
    dim = x.shape[-1]
    if w.dim() == 1:
        normed = F.rms_norm(x, (dim,), w, EPS)
    else:
        txt = F.rms_norm(x[:, :txt_len], (dim,), w[0], EPS)
        img = F.rms_norm(x[:, txt_len:], (dim,), w[1], EPS)
        normed = torch.cat((txt, img), dim=1)
    return apply_rope(normed, cos.float(), sin.float()).transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("txt_len", [0, TXT])
@pytest.mark.parametrize("layout", ["[D]", "[2, D]"])
def test_qk_norm_rope_matches_reference(
    ops, device: str, dtype: torch.dtype, batch: int, dim: int, txt_len: int, layout: str
) -> None:
    gen = torch.Generator().manual_seed(dim * 100 + batch * 10 + txt_len)
    seq = TXT + IMG
    q, k = _fused_qk(batch, seq, dim, dtype, gen)
    q_w, k_w = _norm_weight(layout, dim, dtype, gen), _norm_weight(layout, dim, dtype, gen)
    cos, sin = _rope_table(seq, dim, gen)
    q, k, q_w, k_w, cos, sin = (t.to(device) for t in (q, k, q_w, k_w, cos, sin))
    q_before, k_before = q.clone(), k.clone()

    q_out, k_out = ops.qk_norm_rope(q, k, q_w, k_w, cos, sin, txt_len, EPS)

    for out, x, w in ((q_out, q, q_w), (k_out, k, k_w)):
        assert out.shape == (batch, HEADS, seq, dim) and out.dtype == dtype and out.is_contiguous()
        assert_matches_reference(out, qk_norm_rope_reference(x, w, cos, sin, txt_len))
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def test_qk_norm_rope_double(ops) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k = _fused_qk(1, 33, 16, torch.float64, gen)
    w = _norm_weight("[2, D]", 16, torch.float64, gen)
    cos, sin = _rope_table(33, 16, gen)
    q_out, k_out = ops.qk_norm_rope(q, k, w, w[1], cos, sin, 5, EPS)
    assert q_out.dtype == torch.float64
    torch.testing.assert_close(q_out.float(), qk_norm_rope_reference(q, w, cos, sin, 5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        k_out.float(), qk_norm_rope_reference(k, w[1], cos, sin, 5), atol=1e-5, rtol=1e-5
    )


def test_qk_norm_rope_empty(ops) -> None:
    q = torch.randn(0, 5, 2, 8)
    q_out, k_out = ops.qk_norm_rope(
        q, q, torch.ones(8), torch.ones(8), torch.ones(5, 8), torch.ones(5, 8), 0, EPS
    )
    assert q_out.shape == k_out.shape == (0, 2, 5, 8)


def _qk_args(seq: int = 9, dim: int = 8) -> list:
    q = torch.randn(2, seq, 3, dim)
    return [
        q,
        q.clone(),
        torch.ones(dim),
        torch.ones(2, dim),
        torch.ones(seq, dim),
        torch.zeros(seq, dim),
        4,
        EPS,
    ]


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, torch.randn(2, 9, 3), "q must be"),
        (1, torch.randn(2, 9, 3, 6), "k must have q's shape"),
        (1, torch.randn(2, 9, 3, 8, dtype=torch.float64), "k must have q's dtype"),
        (2, torch.ones(6), "q_norm_w must be"),
        (3, torch.ones(3, 8), "k_norm_w must be"),
        (4, torch.ones(8, 8), "cos must be"),
        (5, torch.ones(9, 8, dtype=torch.int32), "sin must be floating point"),
        (6, 10, "txt_len"),
        (6, -1, "txt_len"),
        (0, torch.randn(2, 9, 3, 16)[..., ::2], "q's last dim must be contiguous"),
    ],
)
def test_qk_norm_rope_rejects_bad_arguments(ops, index: int, value, match: str) -> None:
    args = _qk_args()
    args[index] = value
    if index == 0:
        args[1] = torch.randn(value.shape)
    with pytest.raises(RuntimeError, match=match):
        ops.qk_norm_rope(*args)


def test_qk_norm_rope_rejects_odd_head_dim(ops) -> None:
    with pytest.raises(RuntimeError, match="must be even"):
        ops.qk_norm_rope(*_qk_args(dim=7))


# ---- torch.library.opcheck: schema, autograd registration, Meta kernels under FakeTensor/dynamic shapes ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_fill_cond(ops, dtype: torch.dtype) -> None:
    latents = torch.randn(2, 16, 4, 6, dtype=dtype)[:, ::2]
    mask = torch.rand(2, 1, 32, 48)
    torch.library.opcheck(ops.fill_cond.default, (latents, mask, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_qk_norm_rope(ops, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    q, k = _fused_qk(2, 20, 16, dtype, gen)
    w = _norm_weight("[2, D]", 16, dtype, gen)
    cos, sin = _rope_table(20, 16, gen)
    torch.library.opcheck(ops.qk_norm_rope.default, (q, k, w, w[0], cos, sin, 7, EPS))


def test_cuda_kernel_choice_follows_the_environment(monkeypatch):
    """FLUXFILL_CUDA_KERNELS=native selects the native CUDA kernel, when the library has one."""
    monkeypatch.setattr(native, "available", lambda op, device_type="cpu": device_type == "cuda")
    monkeypatch.delenv("FLUXFILL_CUDA_KERNELS", raising=False)
    assert native.use_native_on_cuda("fill_cond") is False  # triton is installed: Triton by default
    monkeypatch.setenv("FLUXFILL_CUDA_KERNELS", "native")
    assert native.use_native_on_cuda("fill_cond") is True
    monkeypatch.setattr(native, "available", lambda op, device_type="cpu": False)
    assert native.use_native_on_cuda("fill_cond") is False  # nothing to use
