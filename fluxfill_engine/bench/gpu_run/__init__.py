"""``fluxfill bench gpu-run``: what fluxfill-engine does on one GPU, measured in at most 8.5 minutes.

``bash benchmarks/gpu_run.sh`` runs it on the device (after installing the carried wheels);
``fluxfill bench gpu-run --dry-run --out DIR`` runs every part and every variant's code path on the
CPU at a tiny size (``tests/bench/test_gpu_run.py`` does, so CI catches what a CPU can catch), and
``benchmarks/rehearse_gpu_versions.sh`` does so under the GPU machine's versions.

Modules: :mod:`.main` (the verb's arguments and command), :mod:`.preflight` (the import check that
comes before anything), :mod:`.profiles` (the GPU run and the dry run: sizes, dtypes, repeats, the
step variants and their order by value), :mod:`.budget` (time shares, minimums, deadlines and the
limits of one row), :mod:`.workers` (one worker process per part), :mod:`.background` (the native
library's build, started first, and the kernel tests), :mod:`.record` (the JSON record and the guards
around parts and steps), one module per part (:mod:`.machine`, :mod:`.latency`, :mod:`.e2e`,
:mod:`.correctness`, :mod:`.step_cache`) and :mod:`.table` (the summary printed last, the headline
table at its end). It measures internals on purpose: the engine transformer's ``prepare`` and step,
the kernels against their references, the quantized linears, the step cache.

Before the parts: every package they import is imported (one line naming what fails, exit 3), and the
native C++/CUDA library starts building in the background (Ninja, low priority); its outcome is one
row of the correctness part.

Parts, most valuable first (each guarded: an exception is recorded with the tail of its traceback and
the next part runs):

1. ``machine``: device name, driver, torch / triton / CUDA versions; measured bf16 and fp8 matmul
   TFLOP/s (8192^3, random data; fp8 tensor-wise, row-wise, and row-wise with fast accumulation, the
   ceiling of every fp8 row) and device-to-device copy bandwidth.
2. ``latency``: one transformer step at 1024x1024 (the real architecture, random bf16 weights made on
   the GPU, batch 1, random prompt embeddings). The headline rows first: the engine ``reference`` (the
   drift reference), diffusers eager, the engine's ``balanced`` and ``fast`` compiled statically at
   this size, diffusers' regional compile, diffusers + torchao fp8 + compile; then the levers; then
   the rows that explain the presets (each attention backend, fused kernels, native fp8 eager, ``fast``
   with dynamic shapes); last the ``reference`` step on batches of 2 and 4. Each: ms/step (CUDA events,
   median after warm-up), TFLOP/s (74.4 TFLOP per step) and its fraction of the measured ceiling of its
   precision, drift against the engine ``reference`` output (SQNR), memory; each compiled row stops at
   its own limit.
3. ``e2e``: one 1024x1024, 28-step call with T5-XXL, CLIP and the VAE for diffusers eager and engine
   ``fast`` (static shapes): per-stage seconds (text encoding, preparation and VAE encoding,
   denoising, decoding).
4. ``correctness``: the Triton kernels (``fused_attention`` with both k prologues, ``qk_norm_rope``,
   ``fill_cond``) in bf16 and fp16 at FLUX shapes (4096 image + 512 text tokens, 24 heads x 128)
   against their fp32 references and the tolerance table; the native fp8 / int8 linears against an
   fp64 matmul (SQNR); the native library built at the start against the references; the kernel test
   files, which on a CPU skip their GPU cases, run on the GPU.
5. ``step_cache``: the engine step cache: a skipped step against a full step (a guaranteed minimum
   of the budget).

Memory plan (the real model in bf16; GiB = 2^30 bytes). Each part runs in its own worker process,
so everything a part allocated is gone before the next starts; inside a part, every variant or step
is freed (``gc.collect``, compiled graphs reset, ``torch.cuda.empty_cache``) before the next:

===========  ==========================================================================  =========
part         weight copies alive together                                                peak, est
===========  ==========================================================================  =========
machine      two 8192^2 bf16 matrices (+ fp8 copies), two 1 GiB copy buffers              ~3 GiB
correctness  FLUX-shaped activations and one 3072x12288 linear at a time                  ~3 GiB
latency      the base transformer (22.2); the engine fuses its QKV in place (views, no    ~43 GiB
             copy). Variants that change weights work on a weight-sharing clone, one at
             a time, freed after: native fp8 and ``fast`` add their fp8 block linears
             (11 GiB) plus a transient fused bf16 QKV (6.7 GiB) while quantizing;
             torchao fp8 adds fp8 copies of every linear (11 GiB); diffusers compile
             and ``balanced`` add nothing.
e2e          transformer 22.2 + T5-XXL 8.9 + CLIP 0.2 + VAE 0.2; engine ``fast``          ~36 GiB
             quantizes that same transformer in place, block by block, after diffusers
             has run (its bf16 block weights are freed as their fp8 copies appear),
             plus VAE activations at 1024x1024.
step_cache   the base transformer (22.2), eager                                          ~25 GiB
===========  ==========================================================================  =========

An 80 GB H100 has room for all of it; activations at 4608 tokens add 1-3 GiB to each.

Time budget: ``--budget-s`` (450 s by default, counted from the start) is shared by the parts in
proportion to :data:`.budget.GPU_SHARES`. A part may use its own share plus whatever earlier parts
left unused, never the shares of the parts after it nor their minimums (:func:`.budget.part_allowance`);
within a part, a step whose estimated cost no longer fits is skipped with the reason recorded, and a
row stops at its own limit or the part's deadline (:func:`.budget.time_limit`). A worker stops itself
(``SIGALRM``) 20 s after its allowance, recording what it measured; the orchestrator kills one that is
still there 40 s after it (a hung kernel or compiler) and goes on with the next part. So the device
command (``timeout_s=540``) always returns the JSON and the table. The JSON (``gpu_run.json`` under
``--out`` or ``$OUT``) is rewritten after every part and every step: a run cut short keeps what it
measured. Every number in it was measured, except the budget's shares and the cost estimates quoted
in the reasons of steps skipped for time.
"""
