"""``--max-vram`` and ``--memory-plan`` on ``fluxfill inpaint`` and ``fluxfill serve``: the plan chosen for
the model the command loads, handed to its engine config and to the server's engines."""

from __future__ import annotations

import argparse

import pytest

from fluxfill_engine.cli import build_parser, main
from fluxfill_engine.cli.model_args import resolve_model_arguments
from fluxfill_engine.memory_plan import GIB, PLANS, ModelConfigs, choose_memory_plan, weight_bytes
from fluxfill_engine.testing.tiny import save_tiny_model, tiny_components


def _subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("flag", ["--max-vram", "--memory-plan"])
def test_both_commands_have_the_flags(flag):
    helps = [
        next(a for a in _subcommand(c)._actions if flag in a.option_strings).help
        for c in ("inpaint", "serve")
    ]
    assert helps[0] == helps[1] and helps[0]


@pytest.mark.parametrize("command", ["inpaint", "serve"])
def test_max_vram_chooses_the_plan_for_the_built_in_model(command, capsys):
    args = build_parser().parse_args([command, "--device", "cpu", "--max-vram", "2GB"])
    model = resolve_model_arguments(args)
    expected, estimate = choose_memory_plan(
        2 * GIB, quant="none", dtype="float32", configs=ModelConfigs.of_components(tiny_components(0))
    )
    assert model.memory_plan == args.memory_plan == expected.name
    assert f"memory plan {expected.name!r}" in capsys.readouterr().err
    config = model.engine_config()
    assert {name: getattr(config, name) for name in expected.fields()} == expected.fields()


@pytest.mark.slow
def test_max_vram_reads_the_model_folders_configs(tmp_path):
    """A 24 MiB budget is below the tiny model's smallest plan (the estimate's fixed 1 GiB overhead
    alone exceeds it): refused before loading, naming the flag."""
    folder = save_tiny_model(tmp_path / "tiny")
    args = build_parser().parse_args(
        ["inpaint", "--model", str(folder), "--device", "cpu", "--max-vram", "24MiB"]
    )
    with pytest.raises(ValueError, match=r"^--max-vram 24MiB: no memory plan fits .* needs about"):
        resolve_model_arguments(args)
    from_files = weight_bytes(ModelConfigs.from_folder(folder), 4, False, False)
    assert from_files == weight_bytes(ModelConfigs.of_components(tiny_components(0)), 4, False, False)


def test_memory_plan_names_a_plan_and_refuses_others(capsys):
    args = build_parser().parse_args(["serve", "--device", "cpu", "--memory-plan", "block-streaming"])
    config = resolve_model_arguments(args).engine_config()
    assert (config.block_streaming, config.cpu_offload, config.compile) == (True, True, False)
    assert main(["inpaint", "--device", "cpu", "--memory-plan", "tiny-card"]) == 2
    assert "--memory-plan must be one of resident" in capsys.readouterr().err
    assert main(["inpaint", "--device", "cpu", "--memory-plan", PLANS[0].name, "--max-vram", "16GB"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["inpaint", "--device", "cpu", "--max-vram", "sixteen"]) == 2
    assert "--max-vram" in capsys.readouterr().err


def test_serve_hands_the_plan_to_its_engines(monkeypatch):
    from fluxfill_engine.serve import engines

    built = []
    monkeypatch.setattr(engines, "tiny_engine", lambda config, device: built.append(config), raising=False)
    monkeypatch.setattr(
        "fluxfill_engine.testing.demo.tiny_engine", lambda config, device: built.append(config)
    )
    engines.build_engine(engines.EngineSpec(memory_plan="text-encoders-on-cpu"))
    assert built[0].text_encoders_on_cpu and built[0].cpu_offload and not built[0].block_streaming
