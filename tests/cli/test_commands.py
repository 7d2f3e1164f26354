"""The ``fluxfill`` package of subcommands: each one's help, the model arguments they share, the entry
points, and ``fluxfill serve`` handing the checked arguments to the server's start-up."""

import argparse
import subprocess
import sys

import pytest

from fluxfill_engine.cli import build_parser, main
from fluxfill_engine.cli.model_args import resolve_model_arguments
from fluxfill_engine.devices import default_dtype

MODEL_OPTIONS = ("--model", "--base", "--preset", "--device", "--dtype")


def _subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(action for action in parser._actions if flag in action.option_strings)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("inpaint", ["--prompt", "--out", "--steps", "--context-parallel", *MODEL_OPTIONS]),
        ("serve", ["--port", "--api-key", "--ray", *MODEL_OPTIONS]),
        ("bench", ["variants"]),
    ],
)
def test_each_subcommand_answers_its_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"usage: fluxfill {command}" in printed
    assert [flag for flag in expected if flag not in printed] == []


@pytest.mark.parametrize("flag", MODEL_OPTIONS)
def test_inpaint_and_serve_share_the_model_arguments(flag):
    inpaint, serve = _option(_subcommand("inpaint"), flag), _option(_subcommand("serve"), flag)
    assert (inpaint.dest, inpaint.default, inpaint.choices, inpaint.help, inpaint.type) == (
        serve.dest,
        serve.default,
        serve.choices,
        serve.help,
        serve.type,
    )


def test_one_dtype_default_by_device():
    assert default_dtype("cpu") == "float32"
    assert default_dtype("cuda") == default_dtype("cuda:1") == "bfloat16"
    for command in ("inpaint", "serve"):
        args = build_parser().parse_args([command, "--device", "cpu"])
        model = resolve_model_arguments(args)
        assert (model.device, model.dtype, model.preset) == ("cpu", "float32", "reference")
        assert model.engine_config().dtype == "float32"
        args = build_parser().parse_args([command, "--dtype", "float16", "--preset", "fast"])
        assert resolve_model_arguments(args).engine_config().dtype == "float16"


@pytest.mark.parametrize("command", ["inpaint", "serve"])
def test_a_missing_model_path_is_refused_by_either_command(command, tmp_path, capsys):
    args = [command, "--model", str(tmp_path / "none"), "--device", "cpu"]
    assert main(args) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --model: no such file or folder: {str(tmp_path / 'none')!r}"
    )


def test_serve_hands_the_checked_arguments_to_the_start_up(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(
        "fluxfill_engine.serve.main.start_server",
        lambda args, device, dtype: started.append((args.port, args.data_dir, device, dtype)),
    )
    assert main(["serve", "--port", "8123", "--data-dir", str(tmp_path), "--device", "cpu"]) == 0
    assert main(["serve", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert started[0] == (8123, tmp_path, "cpu", "float32")
    assert started[1][2:] == ("cpu", "bfloat16")


@pytest.mark.parametrize("module", ["fluxfill_engine", "fluxfill_engine.cli"])
def test_both_module_entries_run_the_command(module):
    done = subprocess.run([sys.executable, "-m", module, "serve", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: fluxfill serve" in done.stdout and "--dtype" in done.stdout
