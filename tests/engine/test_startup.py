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
