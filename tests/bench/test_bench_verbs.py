"""``fluxfill bench VERB``: every benchmark is a verb whose module exports ``add_arguments`` and
``main``, its help loads no torch, and a record's command line parses back to the same arguments."""

from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys

import pytest

from fluxfill_engine.bench.arguments import command_line
from fluxfill_engine.bench.catalog import MODEL_PRESET_DTYPES, MODEL_PRESET_NAMES
from fluxfill_engine.bench.cli import VERBS, add_bench_parser
from fluxfill_engine.cli import main

EXPECTED_VERBS = [
    "variants",
    "lora",
    "batch",
    "crop",
    "step-cache",
    "serve-load",
    "startup",
    "memory-plans",
    "gpu-run",
    "context-parallel",
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxfill")
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser


def test_every_benchmark_is_a_verb_with_arguments_and_a_main():
    assert list(VERBS) == EXPECTED_VERBS
    for module, summary in VERBS.values():
        verb = importlib.import_module(module)
        assert callable(verb.add_arguments) and callable(verb.main), module
        assert summary, module


def test_bench_help_lists_every_verb_and_a_verb_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(verb in out for verb in EXPECTED_VERBS)
    with pytest.raises(SystemExit) as refused:
        main(["bench"])
    assert refused.value.code == 2


def test_every_verb_help_answers_without_loading_torch():
    code = "\n".join(
        [
            "import sys",
            "from fluxfill_engine.cli import main",
            f"for verb in {EXPECTED_VERBS!r}:",
            "    try:",
            "        main(['bench', verb, '--help'])",
            "    except SystemExit:",
            "        pass",
            "heavy = ('torch', 'diffusers', 'transformers', 'triton', 'numpy', 'PIL')",
            "print('loaded:', *sorted(m for m in heavy if m in sys.modules), file=sys.stderr)",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == "loaded:"
    for verb in EXPECTED_VERBS:
        assert f"usage: fluxfill bench {verb}" in done.stdout, verb


@pytest.mark.parametrize(
    "argv",
    [
        ["batch", "--preset", "cpu-mid", "--batch-sizes", "1,2", "--no-warmup", "--out", "b.json"],
        ["lora", "--ranks", "8", "--strategies", "side", "--markdown", "--note", "two words"],
        ["variants", "--variants", "diffusers,engine:quant=fp8", "--peak-tflops", "bf16=989"],
        ["step-cache", "--thresholds", "0.1,0.5", "--steps", "4"],
        ["startup", "--repeats", "3", "--out", "startup"],
        ["memory-plans", "--preset", "cpu-tiny", "--steps", "1", "--out", "plans.json"],
        ["gpu-run", "--dry-run", "--parts", "latency,e2e", "--out", "dry"],
    ],
    ids=lambda argv: argv[0],
)
def test_a_records_command_line_parses_back_to_the_same_arguments(argv):
    parser = _parser()
    args = parser.parse_args(["bench", *argv])
    line = command_line(args)
    assert line.startswith(f"fluxfill bench {argv[0]} ")
    again = parser.parse_args(shlex.split(line)[1:])  # without "fluxfill"
    mine = {k: v for k, v in vars(args).items() if k != "bench_parser"}
    theirs = {k: v for k, v in vars(again).items() if k != "bench_parser"}
    assert theirs == mine


def test_model_preset_names_without_torch_match_the_models():
    from fluxfill_engine.bench.models import MODEL_PRESETS

    assert tuple(MODEL_PRESETS) == MODEL_PRESET_NAMES
    assert {
        name: str(p.dtype).replace("torch.", "") for name, p in MODEL_PRESETS.items()
    } == MODEL_PRESET_DTYPES
