"""``fluxfill bench``: the benchmark harness, apart from the engine's core.

It drives the engine through its public API only. Modules: :mod:`.runner` (settings, the interleaved
run, the record), :mod:`.variants` (what is compared, each variant's pipeline and stage timing),
:mod:`.models` (model presets, random weights made on the device, FLOP counts, device peaks),
:mod:`.report` (JSON, markdown, plot), :mod:`.cli` (the command) and :mod:`.step_cache_sweep`.
"""
