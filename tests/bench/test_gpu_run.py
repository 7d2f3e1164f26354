"""``fluxfill bench gpu-run``, the one-command GPU run: its CPU dry run end to end through the command
(so nothing a CPU can catch fails on the GPU), its pure helpers, and ``benchmarks/gpu_run.sh``'s usage.
No network."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fluxfill_engine.attention import AutoAttention, sdpa_attention
from fluxfill_engine.bench.gpu_run import preflight
from fluxfill_engine.bench.gpu_run.background import KERNEL_TEST_FILES, parse_pytest_outcomes
from fluxfill_engine.bench.gpu_run.budget import (
    DEFAULT_BUDGET_S,
    GPU_SHARES,
    PART_MINIMUMS,
    PARTS,
    Deadline,
    HardStop,
    RowOverrun,
    hard_stop_after,
    overrun_in,
    part_allowance,
    time_limit,
)
from fluxfill_engine.bench.gpu_run.latency import auto_attention_record, row_limit, selected
from fluxfill_engine.bench.gpu_run.machine import measured_ceiling
from fluxfill_engine.bench.gpu_run.main import parse_parts, parse_rows
from fluxfill_engine.bench.gpu_run.main import run as run_command
from fluxfill_engine.bench.gpu_run.preflight import missing_imports
from fluxfill_engine.bench.gpu_run.profiles import (
    BATCHED,
    HEADLINE_ROWS,
    STEP_VARIANTS,
    StepVariant,
    dry_run_profile,
    rows_in_run_order,
)
from fluxfill_engine.bench.gpu_run.record import SCHEMA
from fluxfill_engine.bench.gpu_run.table import render_table
from fluxfill_engine.bench.gpu_run.workers import WORKER_KILL_GRACE_S
from fluxfill_engine.bench.measure import jsonable
from fluxfill_engine.compilation import compile_unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "fluxfill_engine", "bench", "gpu-run"]
SHELL = ROOT / "benchmarks" / "gpu_run.sh"
REHEARSAL = ROOT / "benchmarks" / "rehearse_gpu_versions.sh"


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
    static = ("balanced:compile_dynamic=0", "fast:compile_dynamic=0")
    if compile_unavailable_reason(torch.device("cpu")) is None:
        assert {"diffusers-compile", *static, "fast"} <= set(measured)
        # The presets compile statically at the benchmark's size, as diffusers' compile row does.
        assert all(
            measured[name]["compiled"] and "static shapes" in measured[name]["compile"] for name in static
        )
        assert "static shapes" in measured["diffusers-compile"]["compile"]
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
    # The native library was built first, in the background, and checked in the correctness part.
    build = record["native_build"]
    assert build["status"] == "ok" and build["build_s"] > 0 and (out / "native-build.log").is_file()
    ninja = shutil.which("ninja") or (Path(sys.executable).parent / "ninja").exists()
    assert build["generator"] == ("Ninja" if ninja else "default")
    assert checks["native"]["status"] == "ok" and checks["native"]["within_tolerance"], checks["native"]
    for name in ("diffusers", "fast"):
        stages = parts["e2e"]["items"][name]
        assert stages["transformer_calls"] == 2 and stages["text_encoder_calls"] == 2, name
        assert stages["denoise_s"] > 0 and stages["total_s"] >= stages["denoise_s"], name
    cache = parts["step_cache"]["items"]["skip_vs_full"]
    assert cache["steps_skipped"] == len(cache["ms_all"]["cache_skips"])
    # No number where nothing was measured: a CPU has no allocator peak.
    assert measured["reference"]["peak_during_steps_gib"] is None
    # The table was printed last, the headline rows at its end, and saved beside the JSON.
    assert "step (1 transformer forward)" in done.stdout and "call (s)" in done.stdout
    table = (out / "gpu_run.txt").read_text().strip()
    assert done.stdout.rstrip().endswith(table)
    headline = table[table.index("headline at 64x64") :].splitlines()
    assert [line[:34].strip() for line in headline[2:9]] == [label for label, _ in HEADLINE_ROWS]
    assert headline[-1].startswith("end to end (2 steps): engine fast")


def test_the_kernel_test_files_the_device_runs_are_in_the_tree() -> None:
    assert KERNEL_TEST_FILES and all((ROOT / path).is_file() for path in KERNEL_TEST_FILES)


def test_part_allowance_protects_later_parts_and_passes_on_savings() -> None:
    allowance = part_allowance
    assert allowance(400, 20, 370) == 30  # 10 s of slack goes to the first part
    assert allowance(300, 100, 100) == 200  # an earlier part finished early: its savings flow on
    assert allowance(150, 100, 100) == 100  # an earlier overrun squeezes the later parts, not this one
    assert allowance(50, 100, 100) == 50  # never more than remains
    assert allowance(-5, 100, 0) == 0
    # ... but never into a later part's guaranteed minimum.
    assert allowance(150, 100, 100, later_minimums_s=15) == 100
    assert allowance(105, 100, 100, later_minimums_s=15) == 90
    assert allowance(10, 100, 20, later_minimums_s=15) == 0


def test_parts_and_rows_run_by_value() -> None:
    assert PARTS[:3] == ("machine", "latency", "e2e") and PARTS[-1] == "step_cache"
    assert PART_MINIMUMS["step_cache"] > 0 and dry_run_profile().minimums["step_cache"] > 0
    groups = [variant.group for variant in STEP_VARIANTS]
    headline = [variant.name for variant in STEP_VARIANTS if variant.group == "headline"]
    assert groups[: len(headline)] == ["headline"] * len(headline)  # the headline rows come first
    assert STEP_VARIANTS[0].name == "reference"  # the drift reference before any other row
    # A row appended for a lever (group left at its default) runs before the rows that only explain.
    lever = StepVariant("engine:compile_mode=max-autotune", clone=True, estimate_s=60)
    levers = [v.name for v in (*STEP_VARIANTS, lever) if v.group == "lever"]
    order = [v.name for v in rows_in_run_order((*STEP_VARIANTS, lever))]
    assert order[: len(headline) + len(levers)] == [*headline, *levers]
    names = {variant.name for variant in STEP_VARIANTS}
    assert {name for _, name in HEADLINE_ROWS} <= names
    # Every compiled headline row has its own limit.
    for variant in STEP_VARIANTS:
        if (
            variant.group == "headline"
            and "compile" in variant.name
            or variant.name.startswith(("balanced", "fast"))
        ):
            assert variant.limit_s is not None and variant.limit_s >= variant.estimate_s, variant
    # The whole default budget, with its last worker's kill grace, fits the device call's 540 s.
    assert DEFAULT_BUDGET_S + WORKER_KILL_GRACE_S + 30 <= 540
    assert sum(GPU_SHARES.values()) < DEFAULT_BUDGET_S


def test_a_row_past_its_own_limit_is_stopped_and_the_next_row_runs() -> None:
    ran: list[str] = []
    start = time.monotonic()
    with hard_stop_after(30):
        with (
            pytest.raises(RowOverrun, match="torchao row passed its own limit of 0 s"),
            time_limit(0.3, "torchao row"),
        ):
            time.sleep(5)
        ran.append("next row")
        outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    assert ran == ["next row"] and time.monotonic() - start < 2
    assert 25 < outer_left <= 30  # the part's own hard stop was set again
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_an_outer_limit_that_comes_first_still_fires_first() -> None:
    with pytest.raises(HardStop), hard_stop_after(0.2), time_limit(10, "row"):
        time.sleep(3)


def test_a_row_limit_never_passes_the_part_deadline_with_a_fake_clock() -> None:
    now = [0.0]
    deadline = Deadline(200, clock=lambda: now[0])
    torchao = next(v for v in STEP_VARIANTS if v.name == "diffusers-fp8-compile")
    assert row_limit(torchao, deadline) == torchao.limit_s  # its own limit, well inside the part
    now[0] = 150.0
    assert row_limit(torchao, deadline) == 50  # late in the part: what is left of it
    eager = next(v for v in STEP_VARIANTS if v.limit_s is None)
    assert row_limit(eager, deadline) == 50
    # The dry run keeps the part's deadline but not the GPU's own limits (a CPU compiles far slower).
    now[0] = 0.0
    assert row_limit(torchao, deadline, own_limits=False) == 200


def test_rows_select_by_name_or_group_and_keep_the_reference() -> None:
    profile = dataclasses.replace(
        dry_run_profile(), rows=parse_rows("lever,engine:quant=fp8,quant_backend=native")
    )
    assert selected(profile, "reference", "headline")
    assert selected(profile, "engine:quant=fp8,quant_backend=native", "more")
    assert selected(profile, "anything", "lever") and not selected(profile, "diffusers", "headline")
    with pytest.raises(ValueError, match="unknown row 'speedy'"):
        parse_rows("speedy")


def test_a_wrapped_overrun_is_still_an_overrun() -> None:
    try:
        try:
            raise RowOverrun("late")
        except RowOverrun as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as outer:
        assert isinstance(overrun_in(outer), RowOverrun)
    assert overrun_in(ValueError("x")) is None


def test_imports_are_checked_before_anything_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    assert missing_imports((("json", "json"),)) == []
    missing = missing_imports((("json", "json"), ("no_such_module_fluxfill", "no-such-wheel")))
    assert missing == ["no-such-wheel (ModuleNotFoundError: No module named 'no_such_module_fluxfill')"]
    monkeypatch.setattr(preflight, "REQUIRED_MODULES", (("no_such_module_fluxfill", "no-such-wheel"),))
    assert run_command(["--dry-run", "--out", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-run: cannot start") and "no-such-wheel" in err[0]
    assert not list(tmp_path.iterdir())  # stopped before anything


def test_auto_attention_drops_reach_the_results_and_the_table() -> None:
    def broken(qkv, rope):
        raise RuntimeError("PassManager::run failed")

    auto = AutoAttention(
        {"triton": broken, "sdpa": sdpa_attention(False)}, timer=lambda fn, q, r: fn(q, r) and 1.0
    )
    auto.dropped["triton"] = "RuntimeError: PassManager::run failed"
    auto.choices[((1, 5, 2, 16),), "float32", "cpu"] = "sdpa"
    row = auto_attention_record(auto)
    assert row["auto_attention_dropped"] == {"triton": "RuntimeError: PassManager::run failed"}
    record = {
        "parts": {
            "latency": {"status": "ok", "items": {"balanced": {"status": "ok", "ms_per_step": 1.0, **row}}}
        }
    }
    assert "auto attention dropped: triton (RuntimeError: PassManager::run failed)" in render_table(record)


def test_headline_table_ratios_fractions_drift_and_end_to_end() -> None:
    def row(ms: float, **extra):
        return {"status": "ok", "ms_per_step": ms, **extra}

    steps = {
        "diffusers": row(300.0),
        "diffusers-compile": row(250.0),
        "diffusers-fp8-compile": row(
            200.0,
            fraction_of_measured_peak=0.31,
            ceiling="fp8_rowwise_fast_accum",
            sqnr_vs_reference_db=28.04,
            fp8_fast_accumulation=True,
        ),
        "reference": row(290.0),
        "balanced:compile_dynamic=0": row(240.0, exact_vs_reference=True),
        "fast:compile_dynamic=0": row(150.0, sqnr_vs_reference_db=27.5, fp8_fast_accumulation=True),
        "fast": {"status": "timed_out", "reason": "fast passed its own limit of 110 s and was stopped"},
    }
    e2e = {
        "diffusers": {"status": "ok", "total_s": 9.0, "steps": 28},
        "fast": {"status": "ok", "total_s": 4.5, "steps": 28},
    }
    record = {
        "mode": "gpu",
        "parts": {
            "latency": {"status": "ok", "items": steps, "model": {"width": 1024, "height": 1024}},
            "e2e": {"status": "ok", "items": e2e},
        },
    }
    lines = render_table(record).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("headline at 1024x1024 (gpu)"))
    table = {line[:34].strip(): line[34:].split() for line in lines[start + 2 : start + 9]}
    best = min(300.0, 250.0, 200.0)
    assert table["diffusers eager"][:3] == ["300.0", "1.00x", f"{best / 300:.2f}x"]
    assert table["diffusers eager"][-1] == "9.00"
    assert table["engine fast"][:4] == ["150.0", f"{300 / 150:.2f}x", f"{best / 150:.2f}x", "-"]
    assert table["engine fast"][-2:] == ["27.5", "4.50"]
    assert table["diffusers + torchao fp8 + compile"][3:6] == ["31", "fp8_rowwise_fast_accum", "28.0"]
    assert table["engine balanced"][5] == "exact" and table["engine reference (eager)"][5] == "ref"
    assert table["engine fast, dynamic shapes"][:2] == ["timed_out:", "fast"]
    assert lines[-2] == "end to end (28 steps): engine fast 4.50 s, diffusers eager 9.00 s: 2.00x"
    assert lines[-1] == "fp8 accumulation: engine fp8 fast, torchao fast"


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
    assert parse_parts("step_cache,3,latency") == ["latency", "e2e", "step_cache"]
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


def test_the_plan_of_calls_fits_the_device_time() -> None:
    """The shell's header names the device calls; with a start of up to 2 minutes and the transfers,
    they fit the 15 minutes of device time, and each call's budget ends inside its timeout."""
    header = SHELL.read_text().split("set -euo pipefail")[0]
    timeouts = [int(t) for t in re.findall(r"timeout_s=(\d+)", header)]
    budgets = [float(b) for b in re.findall(r"--budget-s (\d+)", header)]
    assert len(timeouts) == 2 and len(budgets) == 1
    start_s, transfers_s, install_s = 120, 2 * 15, 15
    assert start_s + sum(timeouts) + transfers_s <= 15 * 60
    for budget, timeout in zip([DEFAULT_BUDGET_S, *budgets], timeouts, strict=True):
        assert install_s + budget + WORKER_KILL_GRACE_S <= timeout


def test_shell_run_needs_the_out_folder() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(["bash", str(SHELL), "run"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "OUT must name the folder" in done.stderr


@pytest.mark.slow
def test_a_failed_native_build_costs_its_row_never_the_part(tmp_path) -> None:
    """The dry run with a cmake that fails: the build's outcome (its log's tail, its seconds) is the
    native row, and every other check of the part still runs."""
    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "cmake"
    fake.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "cmake version 99.0.0"; exit 0; fi\n'
        'echo "CMake Error: a planted configure failure"; exit 1\n'
    )
    fake.chmod(0o755)
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PATH"] = f"{tools}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH")) if p
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [*COMMAND, "--dry-run", "--parts", "correctness", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    record = json.loads((out / "gpu_run.json").read_text())
    build = record["native_build"]
    assert build["status"] == "failed" and build["exit_code"] == 1, build
    assert "a planted configure failure" in build["error"]["log_tail"]
    assert "a planted configure failure" in (out / "native-build.log").read_text()
    part = record["parts"]["correctness"]
    assert part["status"] == "partial" and part["failed_items"] == ["native"], part
    assert part["items"]["native"]["status"] == "failed"
    assert part["items"]["fill_cond/float16"]["status"] == "ok"  # the rest of the part ran
    assert done.returncode == 1 and "native library: " in done.stdout


def test_the_rehearsal_pins_what_the_device_runs_and_what_the_run_carries() -> None:
    pins = dict(re.findall(r'"([a-z-]+)==([0-9.]+)"', REHEARSAL.read_text()))
    assert {"torch", "triton", "transformers", "accelerate"} <= set(pins)
    shell = SHELL.read_text()
    for package, variable in (
        ("diffusers", "DIFFUSERS_VERSION"),
        ("torchao", "TORCHAO_VERSION"),
        ("optimum-quanto", "QUANTO_VERSION"),
    ):
        carried = re.search(rf'{variable}="\$\{{{variable}:-([0-9.]+)\}}"', shell)
        assert carried is not None and pins[package] == carried.group(1), package


def test_the_rehearsal_prints_its_usage() -> None:
    done = subprocess.run(["bash", str(REHEARSAL), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "under the GPU machine's versions" in done.stdout


def test_fp8_rows_are_held_to_the_rowwise_fast_accumulation_ceiling() -> None:
    class FakeRun:
        def __init__(self, matmul: dict) -> None:
            self.record = {"parts": {"machine": {"items": {"matmul": matmul}}}}

    matmul = {
        "bf16": {"tflops": 780.0},
        "fp8": {"tflops": 1500.0},  # tensor-wise: faster, and not how any fp8 row multiplies
        "fp8_rowwise": {"tflops": 1100.0},
        "fp8_rowwise_fast_accum": {"tflops": 1300.0},
    }
    assert measured_ceiling(FakeRun(matmul), "fp8") == ("fp8_rowwise_fast_accum", 1300.0)
    assert measured_ceiling(FakeRun(matmul), "bf16") == ("bf16", 780.0)
    del matmul["fp8_rowwise_fast_accum"]
    assert measured_ceiling(FakeRun(matmul), "fp8") == ("fp8_rowwise", 1100.0)
    assert measured_ceiling(FakeRun({}), "fp8") is None


def test_native_fp8_linears_accumulate_fast_as_torchao_does(monkeypatch) -> None:
    from torch import nn

    from fluxfill_engine import quantization

    calls: list[dict] = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    linear = nn.Linear(32, 16, dtype=torch.bfloat16).requires_grad_(False)
    layer = quantization.QuantizedLinear(linear, "fp8")
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    try:
        layer(torch.randn(4, 32, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError) as error:  # a CPU build without fp8 _scaled_mm
        pytest.skip(f"this torch has no fp8 _scaled_mm on the CPU: {error}")
    assert quantization.FP8_FAST_ACCUM is True and calls and calls[0]["use_fast_accum"] is True
