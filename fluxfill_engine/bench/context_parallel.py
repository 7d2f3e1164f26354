"""``fluxfill bench context-parallel``: ms per denoising step of the engine transformer on N = 1, 2, 4,
8 GPUs.

    fluxfill bench context-parallel --out cp.json              # a multi-GPU machine
    fluxfill bench context-parallel --dry-run --out cp.json    # CPU, tiny model, gloo: the plumbing

For each N it starts ``torchrun --standalone --nproc-per-node N -m fluxfill_engine.bench.context_parallel
--worker``. Every rank builds the real FLUX.1 Fill transformer (``fluxfill_engine.architecture``: 19 + 38
blocks, 24 heads) on the meta device and materialises it on its GPU from the same seed
(:func:`~fluxfill_engine.testing.random_models.random_transformer`, no CPU initialisation), configures
``EngineConfig(context_parallel=N, ...)``, prepares one request (1024x1024: 4096 image + 512 text tokens
by default) and times single steps with CUDA events after a warm-up. Rank 0 reports. The table gives
ms/step, the speedup over N=1 and the efficiency ``ms(1) / (N * ms(N))``, TFLOP/s per GPU, the
all-to-all bytes each rank sends per step, peak memory, and the drift of the N-rank step's output
against N=1's (SQNR, max abs difference).

Sizes that need more GPUs than the machine has, or that do not divide the head count, are reported as
skipped. The dry run runs N = 1, 2 on the tiny model under gloo (tested in
tests/optimizations/test_context_parallel.py). It measures the engine transformer's ``prepare`` and
step directly: a benchmark of that internal path, as a server's request runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch

GUIDANCE = 30.0
# Defaults that differ in the dry run: (on GPUs, dry run).
DEFAULTS = {
    "sizes": ("1,2,4,8", "1,2"),
    "width": (1024, 80),
    "height": (1024, 48),
    "text_tokens": (512, 47),
    "repeats": (10, 3),
    "warmup": (3, 1),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench context-parallel``'s arguments (``--worker`` and ``--result``: one rank)."""
    parser.add_argument("--sizes", default=None, help="comma list of N (default: 1,2,4,8; dry run: 1,2)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, gloo")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 1024; dry run 80)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default 1024; dry run 48)")
    parser.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default 512; dry run 47)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 10; dry run 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; dry run 1)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    parser.add_argument("--attention", default="sdpa", help="EngineConfig.attention (default: sdpa)")
    parser.add_argument("--quant", default="none", help="EngineConfig.quant (default: none)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per size (default: 900)")
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for name, (gpu, dry) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else gpu)
    return args


def transformer_config(dry_run: bool) -> dict[str, Any]:
    from ..architecture import TRANSFORMER_CONFIG
    from ..testing.tiny import TINY_TRANSFORMER_CONFIG

    return dict(TINY_TRANSFORMER_CONFIG if dry_run else TRANSFORMER_CONFIG)


# ---- one rank ----------------------------------------------------------------------------------------


def build_transformer(config: dict[str, Any], device: torch.device, dtype: torch.dtype, dry_run: bool) -> Any:
    """The same random weights on every rank: the tiny model from a CPU seed, the real one materialised
    on the GPU from a device generator with the same seed."""
    import torch

    if dry_run:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        model = FluxTransformer2DModel(**config).eval()
        # Seen as a Module: diffusers decorates ModelMixin.to with functools.wraps(nn.Module.to), which
        # types it with Module.to's unbound signature (`self` first); the call still runs ModelMixin.to.
        return cast("torch.nn.Module", model).to(device=device, dtype=dtype)
    from ..testing.random_models import random_transformer

    return random_transformer(config, device=device, dtype=dtype, seed=0)


def all_to_all_bytes(config: dict[str, Any], tokens: int, size: int, element_bytes: int) -> float:
    """Bytes one rank sends per step: per block, q, k, v out and the attention output back, each
    ``tokens / size`` rows of width ``d``, of which ``(size - 1) / size`` leave the rank."""
    if size == 1:
        return 0.0
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    blocks = int(config["num_layers"]) + int(config["num_single_layers"])
    local = math.ceil(tokens / size)
    return float(blocks * 4 * local * width * element_bytes * (size - 1) / size)


def run_worker(args: argparse.Namespace) -> int:
    """One rank under torchrun: build, prepare, time single steps; rank 0 writes the result."""
    import torch
    import torch.distributed as dist

    from .. import EngineConfig
    from ..parallel import init_distributed, local_rank
    from ..testing.step_inputs import StepInputs, engine_pipeline
    from ..timing import Clock
    from .flops import transformer_flops

    if not init_distributed():
        raise SystemExit("--worker runs under torchrun")
    rank, size = dist.get_rank(), dist.get_world_size()
    cuda = not args.dry_run and torch.cuda.is_available()
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = transformer_config(args.dry_run)
    started = time.perf_counter()
    transformer = build_transformer(config, device, dtype, args.dry_run)
    build_s = time.perf_counter() - started
    pipe = engine_pipeline(transformer)
    engine_config = EngineConfig(
        dtype=str(dtype).replace("torch.", ""),
        attention=args.attention,
        quant=args.quant,
        compile=args.compile,
        context_parallel=size,
    )
    pipe.configure(engine_config)
    fill = pipe.engine_transformer()
    steps = max(args.warmup + args.repeats + 1, 2)
    inputs = StepInputs.random(config, args.width, args.height, args.text_tokens, device, dtype, steps)
    prepared = inputs.prepare(fill, GUIDANCE)
    clock = Clock(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    cold = time.perf_counter()
    output = fill(inputs.latents, 0, prepared)
    clock.sync()
    cold_s = time.perf_counter() - cold
    for index in range(args.warmup):
        fill(inputs.latents, 1 + index, prepared)
    clock.sync()
    dist.barrier()
    marks = [clock.mark()]
    for index in range(args.repeats):
        fill(inputs.latents, 1 + args.warmup + index, prepared)
        marks.append(clock.mark())
    clock.sync()
    times_ms = [1000 * clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)]
    # The slowest rank sets the pace: report the per-step maximum over ranks.
    local = torch.tensor(times_ms, dtype=torch.float64)  # a CPU tensor: gloo carries it
    gathered = [torch.zeros_like(local) for _ in range(size)]
    dist.all_gather(gathered, local)
    slowest = torch.stack(gathered).amax(dim=0).tolist()
    tokens = (args.height // 16) * (args.width // 16)
    flops = transformer_flops(config, tokens, args.text_tokens).total
    ms = statistics.median(slowest)
    if rank == 0:
        output_path = args.result.with_suffix(".pt")
        torch.save(output.detach().float().cpu(), output_path)
        record = {
            "size": size,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dtype": str(dtype).replace("torch.", ""),
            "engine_config": engine_config.describe(),
            "image_tokens": tokens,
            "text_tokens": args.text_tokens,
            "build_s": build_s,
            "cold_step_s": cold_s,
            "ms_per_step": ms,
            "ms_all": slowest,
            "tflops_per_gpu": flops / (ms / 1000) / size / 1e12,
            "all_to_all_bytes_per_rank_per_step": all_to_all_bytes(
                config, tokens + args.text_tokens, size, torch.finfo(dtype).bits // 8
            ),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "output": str(output_path),
        }
        args.result.write_text(json.dumps(record))
    return 0


# ---- the launcher ---------------------------------------------------------------------------------


def compare(reference: torch.Tensor, output: torch.Tensor) -> dict[str, Any]:
    """How far the N-rank step's output is from N=1's."""
    from ..metrics import sqnr_db

    return {"max_abs_diff": float((reference - output).abs().max()), "sqnr_db": sqnr_db(reference, output)}


def worker_argv(args: argparse.Namespace, result: Path) -> list[str]:
    argv = [
        "--worker",
        "--result",
        str(result),
        "--width",
        str(args.width),
        "--height",
        str(args.height),
        "--text-tokens",
        str(args.text_tokens),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--attention",
        args.attention,
        "--quant",
        args.quant,
    ]
    return argv + (["--dry-run"] if args.dry_run else []) + (["--compile"] if args.compile else [])


def run_size(args: argparse.Namespace, size: int, folder: Path) -> dict[str, Any]:
    from .measure import tree_environment

    result = folder / f"size-{size}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={size}"]
    command += ["-m", "fluxfill_engine.bench.context_parallel", *worker_argv(args, result)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=tree_environment()
        )
    except subprocess.TimeoutExpired:
        return {"size": size, "skipped": f"timed out after {args.timeout:.0f} s"}
    if done.returncode != 0 or not result.is_file():
        return {
            "size": size,
            "error": f"exit {done.returncode}",
            "output_tail": (done.stdout + done.stderr)[-4000:],
        }
    return json.loads(result.read_text())


def render_table(record: dict[str, Any]) -> str:
    lines = [
        "| N | ms/step | speedup | efficiency | TFLOP/s per GPU | all-to-all MB/rank/step | peak GiB | SQNR vs N=1 dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["results"]:
        if "ms_per_step" not in row:
            why = row.get("skipped") or row.get("error")
            lines.append(f"| {row['size']} | {why} | | | | | | |")
            continue
        peak = row.get("peak_memory_gib")
        drift = row.get("vs_size_1")
        sqnr = "-" if drift is None else "exact" if drift["sqnr_db"] is None else f"{drift['sqnr_db']:.1f}"
        lines.append(
            f"| {row['size']} | {row['ms_per_step']:.2f} | {row.get('speedup', float('nan')):.2f}x "
            f"| {row.get('efficiency', float('nan')):.0%} | {row['tflops_per_gpu']:.1f} "
            f"| {row['all_to_all_bytes_per_rank_per_step'] / 1e6:.1f} | {'-' if peak is None else f'{peak:.1f}'} "
            f"| {sqnr} |"
        )
    return "\n".join(lines)


def run_launcher(args: argparse.Namespace) -> int:
    """Each N as its own torchrun; the table, the JSON record."""
    import torch

    config = transformer_config(args.dry_run)
    heads = int(config["num_attention_heads"])
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    sizes = [int(part) for part in str(args.sizes).split(",") if part]
    record: dict[str, Any] = {
        "benchmark": "context_parallel",
        "dry_run": args.dry_run,
        "gpus": gpus,
        "width": args.width,
        "height": args.height,
        "text_tokens": args.text_tokens,
        "compile": args.compile,
        "attention": args.attention,
        "quant": args.quant,
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="fluxfill-cp-") as tmp:
        folder = Path(tmp)
        outputs: dict[int, torch.Tensor] = {}
        for size in sizes:
            if heads % size:
                row = {"size": size, "skipped": f"{size} does not divide the {heads} heads"}
            elif not args.dry_run and size > gpus:
                row = {"size": size, "skipped": f"needs {size} GPUs, this machine has {gpus}"}
            else:
                row = run_size(args, size, folder)
            if "output" in row:
                outputs[size] = torch.load(row.pop("output"))
                if 1 in outputs and size != 1:
                    row["vs_size_1"] = compare(outputs[1], outputs[size])
            record["results"].append(row)
            brief = ("size", "ms_per_step", "tflops_per_gpu", "vs_size_1", "skipped", "error")
            print(json.dumps({k: row[k] for k in brief if k in row}), flush=True)
    base = next((r["ms_per_step"] for r in record["results"] if r["size"] == 1 and "ms_per_step" in r), None)
    for row in record["results"]:
        if base is not None and "ms_per_step" in row:
            row["speedup"] = base / row["ms_per_step"]
            row["efficiency"] = row["speedup"] / row["size"]
    record["table"] = render_table(record)
    print(record["table"])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    failed = [r for r in record["results"] if "error" in r]
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    """Run every N (or, with ``--worker``, be one rank of one N)."""
    args = _with_defaults(args)
    if args.worker:
        return run_worker(args)
    return run_launcher(args)


def run(argv: Sequence[str] | None = None) -> int:
    """The command from its own argument list (how torchrun starts each rank)."""
    parser = argparse.ArgumentParser(prog="python -m fluxfill_engine.bench.context_parallel")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
