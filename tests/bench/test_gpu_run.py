"""``fluxfill bench gpu-run``, the one-command GPU run: its CPU dry run end to end through the command
(so nothing a CPU can catch fails on the GPU), its pure helpers, and ``benchmarks/gpu_run.sh``'s usage.
No network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxfill_engine.bench.gpu_run.background import KERNEL_TEST_FILES, parse_pytest_outcomes
from fluxfill_engine.bench.gpu_run.budget import PARTS, Deadline, part_allowance
from fluxfill_engine.bench.gpu_run.main import parse_parts
from fluxfill_engine.bench.gpu_run.profiles import BATCHED, STEP_VARIANTS, dry_run_profile
from fluxfill_engine.bench.gpu_run.record import SCHEMA
from fluxfill_engine.bench.gpu_run.table import render_table
from fluxfill_engine.bench.measure import jsonable
from fluxfill_engine.compilation import compile_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "fluxfill_engine", "bench", "gpu-run"]
SHELL = ROOT / "benchmarks" / "gpu_run.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """The dry run, once for this file: exit status and output, the JSON it wrote, its folder."""
    out = tmp_path_factory.mktemp("gpu-run-dry")
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"  # the kernels on CPU tensors (the test suite sets it too)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH")) if p
    )
    done = subprocess.run(
        [*COMMAND, "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    path = out / "gpu_run.json"
    assert path.is_file(), (
        f"no JSON written; exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done, json.loads(path.read_text()), out


@pytest.mark.slow
def test_dry_run_runs_every_part_and_variant(dry_run) -> None:
    done, record, out = dry_run
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    assert record["schema"] == SCHEMA and record["mode"] == "dry-run" and record["complete"] is True
    assert list(record["parts"]) == list(PARTS)
    for name, part in record["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "skipped":
            assert part.get("reason"), name
        for key, item in part.get("items", {}).items():
            # Every step either measured or skipped with its reason; none failed.
            assert item["status"] in ("ok", "skipped"), (name, key, item)
            if item["status"] == "skipped":
                assert item.get("reason"), (name, key)
    parts = record["parts"]
    assert all(parts[p]["status"] == "ok" for p in PARTS)
    # Every step variant of part 3 appears, measured or with the reason it cannot run here.
    batched = {f"{BATCHED.name}:batch={size}" for size in dry_run_profile().batch_sizes}
    assert set(parts["latency"]["items"]) == {v.name for v in STEP_VARIANTS} | batched
    measured = {k: v for k, v in parts["latency"]["items"].items() if v["status"] == "ok"}
    assert {"reference", "diffusers", "engine:quant=fp8,quant_backend=native"} <= set(measured)
    if compile_unavailable_reason(torch.device("cpu")) is None:
        assert {"diffusers-compile", "balanced", "fast"} <= set(measured)
        assert measured["fast"]["compiled"] and measured["balanced"]["compiled"]
    for name, item in measured.items():
        assert item["ms_per_step"] > 0 and item["tflops"] > 0 and item["output_finite"], name
        assert len(item["ms_all"]) >= 5, name
        if name != "reference":
            assert item["sqnr_vs_reference_db"] is None or item["sqnr_vs_reference_db"] > 15, name
    assert "fp8" in parts["latency"]["items"]["diffusers-fp8-compile"]["reason"]
    # Batched steps: every image of the batch is the batch-1 output (the same inputs), to bf16 rounding.
    for name in batched:
        item = measured[name]
        assert item["ms_per_image_step"] == pytest.approx(item["ms_per_step"] / item["batch_size"])
        assert item["speedup_per_image_vs_batch_1"] > 0
        assert item["sqnr_vs_reference_db"] is None or item["sqnr_vs_reference_db"] > 30, name
    assert "batching, ms per image-step: batch 2" in done.stdout
    # The kernels within the tolerance table, the quantized linears within their SQNR bounds.
    checks = parts["correctness"]["items"]
    for key, item in checks.items():
        if item["status"] == "ok" and "within_tolerance" in item:
            assert item["within_tolerance"], (key, item)
        if item["status"] == "ok" and "within_bound" in item:
            assert item["within_bound"], (key, item)
    assert checks["kernel_tests"]["collected"] > 0
    for name in ("diffusers", "fast"):
        stages = parts["e2e"]["items"][name]
        assert stages["transformer_calls"] == 2 and stages["text_encoder_calls"] == 2, name
        assert stages["denoise_s"] > 0 and stages["total_s"] >= stages["denoise_s"], name
    cache = parts["step_cache"]["items"]["skip_vs_full"]
    assert cache["steps_skipped"] == len(cache["ms_all"]["cache_skips"])
    # No number where nothing was measured: a CPU has no allocator peak.
    assert measured["reference"]["peak_during_steps_gib"] is None
    # The table was printed last (its last row is the step cache's), and saved beside the JSON.
    assert "step (1 transformer forward)" in done.stdout and "call (s)" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("step cache: full step")
    assert (out / "gpu_run.txt").read_text().strip() in done.stdout


def test_the_kernel_test_files_the_device_runs_are_in_the_tree() -> None:
    assert KERNEL_TEST_FILES and all((ROOT / path).is_file() for path in KERNEL_TEST_FILES)


def test_part_allowance_protects_later_parts_and_passes_on_savings() -> None:
    allowance = part_allowance
    assert allowance(400, 20, 370) == 30  # 10 s of slack goes to the first part
    assert allowance(300, 100, 100) == 200  # an earlier part finished early: its savings flow on
    assert allowance(150, 100, 100) == 100  # an earlier overrun squeezes the later parts, not this one
    assert allowance(50, 100, 100) == 50  # never more than remains
    assert allowance(-5, 100, 0) == 0


def test_deadline_fits_and_nests() -> None:
    now = [100.0]
    deadline = Deadline(30, clock=lambda: now[0])
    assert deadline.fits(30) and not deadline.fits(31)
    now[0] = 110.0
    assert deadline.left() == 20
    inner = deadline.within(50)
    assert inner.left() == 20  # never later than the outer deadline
    assert deadline.within(5).left() == 5
    now[0] = 200.0
    assert deadline.left() == 0 and not deadline.fits(1)


def test_parse_parts_by_name_or_number_in_run_order() -> None:
    assert parse_parts(None) == list(PARTS)
    assert parse_parts("e2e,3") == ["latency", "e2e"]
    with pytest.raises(ValueError, match="unknown part 'speed'"):
        parse_parts("speed")


def test_pytest_outcomes_from_verbose_output_with_and_without_xdist() -> None:
    output = "\n".join(
        [
            "tests/test_a.py::test_one[bf16] PASSED                [ 50%]",
            "[gw1] [ 75%] FAILED tests/test_b.py::test_two[B1-L177-H1-D16] ",
            "[gw0] [100%] SKIPPED tests/test_b.py::test_three ",
            "FAILED tests/test_b.py::test_two[B1-L177-H1-D16] - AssertionError: no",
        ]
    )
    assert parse_pytest_outcomes(output) == {
        "tests/test_a.py::test_one[bf16]": "PASSED",
        "tests/test_b.py::test_two[B1-L177-H1-D16]": "FAILED",
        "tests/test_b.py::test_three": "SKIPPED",
    }


def test_table_renders_partial_records_and_shows_only_measured_numbers() -> None:
    record = {
        "mode": "gpu",
        "elapsed_s": 12.0,
        "complete": False,
        "parts": {
            "machine": {"status": "ok", "seconds": 3.0, "items": {"matmul": {"bf16": {"tflops": 790.4}}}},
            "correctness": {"status": "failed", "seconds": 1.0, "error": {"message": "boom"}, "items": {}},
            "latency": {
                "status": "partial",
                "seconds": 5.0,
                "items": {
                    "reference": {"status": "ok", "ms_per_step": 190.2, "tflops": 391.0},
                    "fast": {"status": "skipped", "reason": "fast needs about 55 s"},
                },
            },
        },
    }
    table = render_table(record)
    assert "bf16 790.4" in table and "boom" in table and "fast needs about 55 s" in table
    assert "190.2" in table and "391.0" in table
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert lines["e2e"].split()[1] == "-"  # a part with no record shows no numbers


def test_jsonable_makes_records_json_safe() -> None:
    clean = jsonable(
        {
            "a": float("nan"),
            "b": [1.0, float("inf")],
            "c": torch.tensor(2.5),
            3: (True, None),
            "d": torch.ones(65),
        }
    )
    assert clean == {"a": None, "b": [1.0, None], "c": 2.5, "3": [True, None], "d": "tensor(65,)"}
    json.dumps(clean, allow_nan=False)


def _command(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run([*COMMAND, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_command_refuses_bad_arguments_before_doing_anything(tmp_path) -> None:
    done = _command("--parts", "nope", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown part 'nope'" in done.stderr
    done = _command("--dry-run")
    assert done.returncode == 2 and "--out" in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_command_without_a_gpu_points_at_the_dry_run(tmp_path) -> None:
    done = _command("--out", str(tmp_path))
    assert done.returncode == 2 and "--dry-run" in done.stderr


@pytest.mark.parametrize("args", [["--help"], ["no-such-action"]], ids=["help", "unknown"])
def test_shell_prints_usage_and_exits_2(args: list[str]) -> None:
    done = subprocess.run(["bash", str(SHELL), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "bash benchmarks/gpu_run.sh wheels" in done.stdout
    assert 'run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=540)' in done.stdout


def test_shell_run_needs_the_out_folder() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", str(SHELL), "run"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "OUT must name the folder" in done.stderr
