"""Regional torch.compile: fullgraph with no graph breaks, one graph per block type, no recompiles per
resolution, quantized layers and custom ops inside, and a warm start from a cache in a second process
that gives identical images.

Compiling takes ~40 s on 2 CPU cores, so there are only two tests.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from fluxfill_engine import EngineConfig, FluxFillPipeline
from fluxfill_engine.testing.tiny import tiny_components
from tests.support import helpers

SIZES = [(32, 48), (64, 48), (48, 80)]


def run(pipe, height, width):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, height, width, generator=gen)
    mask = torch.zeros(1, 1, height, width)
    mask[..., 8:24, 8:24] = 1
    return pipe(
        prompt="a red cup",
        image=image,
        mask_image=mask,
        height=height,
        width=width,
        num_inference_steps=4,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


@pytest.mark.slow
def test_compiled_blocks_fullgraph_one_graph_per_block_type_and_no_recompile_per_size():
    # Quantized layers, custom ops and the step cache (a huge threshold: only forced steps run in full,
    # so eager and compiled runs skip the same steps) all inside / around the compiled blocks.
    config = EngineConfig(
        quant="int8", quant_backend="native", fused_kernels=True, attention="triton", step_cache_threshold=1e9
    )
    eager = FluxFillPipeline(**tiny_components()).configure(config)
    compiled = FluxFillPipeline(**tiny_components()).configure(
        EngineConfig(**{**config.describe(), "compile": True})
    )
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
    torch._dynamo.reset()
    counters.clear()
    graphs_after_first = None
    for height, width in SIZES:
        expected, actual = run(eager, height, width), run(compiled, height, width)
        # int8 W8A8 rounds activations to integers: Inductor's x/scale may round a few of them to the
        # neighbouring step, so compare as a lossy path (SQNR) rather than bit for bit.
        sqnr = helpers.sqnr(expected, actual)
        print(f"{height}x{width}: compiled vs eager SQNR {sqnr:.1f} dB")
        assert sqnr >= 40
        assert compiled.last_stats["steps_cached"] == eager.last_stats["steps_cached"] > 0
        graphs_after_first = graphs_after_first or counters["stats"]["unique_graphs"]
    assert dict(counters["graph_break"]) == {}
    assert graphs_after_first == 2  # one per block type: 2 double + 2 single blocks compile as 2 graphs
    assert counters["stats"]["unique_graphs"] <= graphs_after_first + 1  # at most one recompile


WARM_START_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from torch._dynamo.utils import counters
    from fluxfill_engine import EngineConfig, FillRequest
    from fluxfill_engine.testing.demo import tiny_engine

    cache_dir, out = sys.argv[1], sys.argv[2]
    engine = tiny_engine(EngineConfig(compile=True, compile_cache_dir=cache_dir))
    report = engine.warmup(sizes=[(256, 256)], num_inference_steps=1)
    image = np.linspace(0, 1, 256 * 256 * 3, dtype=np.float32).reshape(256, 256, 3)
    mask = np.zeros((256, 256), np.float32)
    mask[64:192, 64:192] = 1
    result = engine.run(FillRequest("a cup", image, mask, num_inference_steps=1, seed=0, max_megapixels=0.065))
    np.save(out, np.asarray(result.images[0]))
    print(json.dumps({
        "loaded": engine.pipeline.compile_cache is not None,
        "saved": report["compile_cache"] is not None,
        "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "seconds": report["seconds"],
    }))
    """
)


@pytest.mark.slow
def test_warm_start_loads_the_compile_cache_in_a_second_process(tmp_path):
    cache_dir = tmp_path / "compile-cache"
    runs = []
    for name in ("cold", "warm"):
        # A fresh Inductor cache per process: only our compile_cache_dir can make the second one warm.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}")}
        output = tmp_path / f"{name}.npy"
        done = subprocess.run(
            [sys.executable, "-c", WARM_START_SCRIPT, str(cache_dir), str(output)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append((json.loads(done.stdout.strip().splitlines()[-1]), np.load(output)))
    (cold, cold_image), (warm, warm_image) = runs
    assert not cold["loaded"] and cold["saved"]
    assert warm["loaded"] and warm["fx_cache_hits"] > 0
    np.testing.assert_array_equal(cold_image, warm_image)


def test_compile_without_a_compiler_is_a_clear_error(monkeypatch):
    import fluxfill_engine.compilation as compilation

    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    pipe = FluxFillPipeline(**tiny_components())
    with pytest.raises(ValueError, match="compile=True cannot be honoured on cpu.*C\\+\\+ compiler"):
        pipe.configure(EngineConfig(compile=True))
