"""Start-up: the command line's help, ``import fluxfill_engine`` and the LoRA spec checks load no heavy or
optional package."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "torchao", "optimum", "triton")


def _loaded_after(code: str) -> set[str]:
    # The help text goes to stdout too: the modules loaded are reported on stderr's last line.
    report = f"print('loaded:', *sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\n{report}"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stderr.strip().splitlines()[-1].split()[1:])


@pytest.mark.parametrize(
    "code",
    [
        "import fluxfill_engine",
        "from fluxfill_engine import EngineConfig; EngineConfig.preset('fast')",
        "from fluxfill_engine.cli import build_parser; build_parser().format_help()",
        "from fluxfill_engine.cli import main\ntry:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass",
        "from fluxfill_engine.lora.spec import check_lora_specs; check_lora_specs([{'path': 'a.safetensors'}], 3)",
    ],
    ids=["import", "config", "help", "bench-help", "lora-spec"],
)
def test_nothing_heavy_is_imported(code):
    assert _loaded_after(code) == set()


@pytest.mark.slow
def test_the_public_names_load_on_first_use():
    loaded = _loaded_after("import fluxfill_engine\nfluxfill_engine.FluxFillPipeline")
    assert {"torch", "diffusers"} <= loaded


def test_fluxfill_help_answers():
    done = subprocess.run([sys.executable, "-m", "fluxfill_engine", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "inpaint" in done.stdout and "bench" in done.stdout


# ---- the start report: where an engine's start went ----------------------------------------------


def test_the_start_report_says_where_the_start_went(tmp_path):
    from fluxfill_engine import EngineConfig, FluxFillEngine
    from fluxfill_engine.testing.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    engine = FluxFillEngine.from_pretrained(folder, config=EngineConfig(quant="int8"))
    report = engine.start_report
    assert report.source == "diffusers folder"
    assert list(report.seconds) == ["read_weights", "build"]
    assert all(seconds > 0 for seconds in report.seconds.values())
    engine.warmup(sizes=[(256, 256)], num_inference_steps=1)
    assert list(report.seconds) == ["read_weights", "build", "warm_up", "compile"]
    assert report.seconds["compile"] == 0.0  # nothing compiles without compile=True
    assert report.total == pytest.approx(sum(report.seconds.values()))
    assert report.line().startswith(f"start {report.total:.2f} s from diffusers folder: read_weights")
    assert report.as_dict()["seconds"].keys() == report.seconds.keys()

    engine.save(tmp_path / "saved")
    saved = FluxFillEngine.from_pretrained(tmp_path / "saved").start_report
    assert saved.source == "saved engine" and list(saved.seconds) == ["read_weights", "build"]


def test_an_engine_built_from_a_pipeline_reports_its_build():
    from fluxfill_engine import EngineConfig
    from fluxfill_engine.testing.demo import tiny_engine

    report = tiny_engine(EngineConfig()).start_report
    assert report.source == "pipeline" and list(report.seconds) == ["build"]


def test_the_compile_time_is_the_compilers_own():
    import torch

    from fluxfill_engine.startup import StartReport, compiler_seconds

    report = StartReport()
    with report.phase("warm_up"):
        before = compiler_seconds()
        torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert compiler_seconds() > before
    assert 0 < report.seconds["compile"] <= report.seconds["warm_up"]


@pytest.mark.slow
def test_serve_reports_the_start_on_healthz(tmp_path):
    import httpx

    from fluxfill_engine import EngineConfig
    from fluxfill_engine.testing.demo import tiny_engine
    from tests.support.serve import make_app, server_in_thread

    engine = tiny_engine(EngineConfig())
    with server_in_thread(make_app(tmp_path, engine)) as base:
        health = httpx.get(f"{base}/healthz").json()
    assert health["start"]["source"] == "pipeline"
    assert health["start"]["seconds"].keys() == engine.start_report.seconds.keys()
