"""``fluxfill bench VERB``: every benchmark of fluxfill-engine, apart from the engine's core.

Verbs (:mod:`.cli` registers them; each module exports ``add_arguments`` and ``main``): ``variants``
(:mod:`.variants`; the variants named in :mod:`.catalog`, run by :mod:`.runner`, each timed by
:mod:`.runners`, summarised by :mod:`.summary`, written by :mod:`.report`), ``lora`` (:mod:`.lora_bench`), ``batch``
(:mod:`.batch_bench`), ``crop`` (:mod:`.crop_compare`), ``step-cache`` (:mod:`.step_cache_sweep`),
``serve-load`` (:mod:`.serve_load`), ``gpu-run`` (the subpackage :mod:`.gpu_run`) and
``context-parallel`` (:mod:`.context_parallel`). Shared: :mod:`.measure` (device time, stage time
through forward hooks, memory, the matmul ceiling, statistics, the environment), :mod:`.flops` (work
per step, device peaks), :mod:`.models` (the ``--preset`` models), :mod:`.arguments` (the shared
options). The models and step inputs are built by :mod:`fluxfill_engine.testing`; drift is
:mod:`fluxfill_engine.metrics`.

What they drive. The end-to-end verbs go through the public API: ``FluxFillPipeline`` (``configure``,
``generate`` returning a ``PipelineResult`` with its timings and stats, ``set_engine_loras``,
``prompt_cache``, ``engine_transformer()`` for the resolved dtype and quantization plan),
``FluxFillEngine`` with ``FillRequest``, ``EngineConfig`` and its presets, and ``fluxfill serve`` over
HTTP. Beyond it, on purpose:

- the capability probes that say which variants run on this machine and why not:
  ``compilation.compile_unavailable_reason``, ``attention.backend_unavailable_reason``,
  ``quantization.resolve`` / ``has_fp8_tensor_cores``; and ``quantization.weight_bytes`` for the
  weights each variant holds;
- ``lora``: ``pipe.runtime.lora_cache(...).clear()``, so the first call of each set reads its files;
- ``gpu-run`` and ``context-parallel`` benchmark internals: the engine transformer's ``prepare`` and
  single steps (``FillTransformer``), the step cache (``cache.StepCache``), the Triton and native
  kernels against their references (``fluxfill_kernels``), the quantized linears
  (``quantization.quantize_linear``), the process group (``parallel``).
"""
