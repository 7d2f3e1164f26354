"""``EngineConfig.compile_mode``: validated, and handed to ``torch.compile`` for every block (nothing is
compiled here: ``Module.compile`` is recorded, not run; test_compile.py compiles for real)."""

import pytest
import torch
from torch import nn

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.compilation import compile_blocks
from fluxfill_engine.config import COMPILE_MODES
from fluxfill_engine.testing.tiny import tiny_components


@pytest.fixture
def compile_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[nn.Module, dict]]:
    calls: list[tuple[nn.Module, dict]] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    return calls


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_every_block_gets_the_mode(mode: str, compile_calls: list) -> None:
    blocks = [nn.Linear(2, 2), nn.Linear(2, 2)]
    compile_blocks(blocks, mode, dynamic=False, device=torch.device("cpu"))
    expected_mode = None if mode == "default" else mode  # torch.compile's own default
    assert [block for block, _ in compile_calls] == blocks
    assert all(kw == {"fullgraph": True, "dynamic": False, "mode": expected_mode} for _, kw in compile_calls)


def test_reduce_overhead_reaches_the_engine_blocks(compile_calls: list) -> None:
    pipe = FluxFillPipeline(**tiny_components(0))
    config = EngineConfig(compile=True, compile_mode="reduce-overhead", compile_dynamic=False)
    pipe.configure(config)
    fill = pipe.engine_transformer()
    assert fill.compile_settings == ("reduce-overhead", False)
    assert {id(block) for block, _ in compile_calls} == {id(block) for block in fill.blocks()}
    assert all(kw["mode"] == "reduce-overhead" for _, kw in compile_calls)


@pytest.mark.parametrize("mode", ["cudagraphs", "Reduce-Overhead", "", None])
def test_unknown_mode_is_refused_by_name(mode) -> None:
    with pytest.raises(ValueError, match=r"EngineConfig.compile_mode must be one of \[.*'reduce-overhead'"):
        EngineConfig(compile=True, compile_mode=mode)
    with pytest.raises(ValueError, match=r"compile_mode must be one of"):
        compile_blocks([nn.Linear(2, 2)], mode, dynamic=True, device=torch.device("cpu"))  # type: ignore[arg-type]
