"""Command line: ``fluxfill inpaint`` and ``fluxfill bench`` (:mod:`.bench`).

Without ``--model`` it runs the built-in tiny random-weight model (the output is noise; the point is
that the whole path runs). Without ``--image``/``--mask`` it paints into a built-in demo image.
Heavy imports (torch, diffusers) happen inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import PRESETS, EngineConfig
from .limits import MAX_IMAGES, MAX_SIZE, MAX_STEPS, MIN_SIZE

if TYPE_CHECKING:
    import PIL.Image

    from .engine import Event, FluxFillEngine


def demo_inputs(width: int, height: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A smooth colour gradient and a centred rectangular mask covering half of each side."""
    import numpy as np
    import PIL.Image

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1), 0.5 + 0.0 * xs], axis=-1)
    image = PIL.Image.fromarray((rgb * 255).round().astype(np.uint8))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 255
    return image, PIL.Image.fromarray(mask)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxfill", description="FLUX.1 Fill [dev] inpainting, fast and lean (fluxfill-engine)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inpaint = commands.add_parser(
        "inpaint",
        help="repaint the white part of a mask from a prompt",
        description="Repaint the white part of MASK in IMAGE following PROMPT and write PNG file(s).",
    )
    inpaint.add_argument("--prompt", default="a white paper cup", help="what to paint (default: %(default)r)")
    inpaint.add_argument("--image", type=Path, help="input image (default: a built-in demo gradient)")
    inpaint.add_argument("--mask", type=Path, help="mask image, white = repaint (default: a centred box)")
    inpaint.add_argument(
        "--out", type=Path, default=Path("out.png"), help="output PNG (default: %(default)s)"
    )
    inpaint.add_argument(
        "--model",
        type=Path,
        help="a diffusers FLUX.1 Fill folder, or a single-file transformer checkpoint with --base "
        "(default: the built-in tiny random-weight model)",
    )
    inpaint.add_argument(
        "--base",
        type=Path,
        help="with a single-file --model: the diffusers folder with the other components",
    )
    inpaint.add_argument(
        "--steps", type=int, default=28, help=f"denoising steps, 1-{MAX_STEPS} (default: 28)"
    )
    inpaint.add_argument("--guidance", type=float, default=30.0, help="guidance scale, 0-100 (default: 30)")
    inpaint.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    inpaint.add_argument(
        "--width", type=int, help=f"output width, {MIN_SIZE}-{MAX_SIZE} (default: the image's, or 512)"
    )
    inpaint.add_argument(
        "--height", type=int, help=f"output height, {MIN_SIZE}-{MAX_SIZE} (default: the image's, or 512)"
    )
    inpaint.add_argument("--num-images", type=int, default=1, help=f"images, 1-{MAX_IMAGES} (default: 1)")
    inpaint.add_argument(
        "--preset",
        default="reference",
        choices=sorted(PRESETS),
        help="optimization preset (default: reference)",
    )
    inpaint.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    inpaint.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    from .bench.cli import add_bench_parser

    add_bench_parser(commands)
    return parser


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


class _StepProgress:
    """A tqdm progress bar driven by the engine's ``step`` events."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, event: Event) -> None:
        from tqdm.auto import tqdm

        if event.type == "step":
            if self.bar is None:
                self.bar = tqdm(total=event.total, desc="denoising", unit="step", file=sys.stderr)
            self.bar.update(1)
        elif event.type in ("decode_start", "error") and self.bar is not None:
            self.bar.close()
            self.bar = None


def tiny_engine(config: EngineConfig, device: str | None = None, seed: int = 0) -> FluxFillEngine:
    """An engine on the built-in tiny random-weight model (:mod:`.tiny`): every stage runs, the
    images are noise."""
    from .engine import FluxFillEngine
    from .pipeline import FluxFillPipeline
    from .tiny import tiny_components

    dtype = config.torch_dtype
    components = tiny_components(seed) if dtype is None else tiny_components(seed, dtype=dtype)
    return FluxFillEngine(FluxFillPipeline(**components), config=config, device=device)


def run_inpaint(args: argparse.Namespace) -> int:
    from .engine import FillRequest, FluxFillEngine

    device = args.device or _default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    config = EngineConfig.preset(args.preset, dtype=dtype)
    if args.model is None:
        print("No --model given: running the built-in tiny random-weight model. Its output is noise;")
        print("the point is that every stage of the real path runs.")
        engine = tiny_engine(config, device=device)
    else:
        print(f"Loading {args.model} ...")
        engine = FluxFillEngine.from_pretrained(args.model, config=config, device=device, base=args.base)

    if (args.image is None) != (args.mask is None):
        raise SystemExit("error: give both --image and --mask, or neither (to use the built-in demo inputs)")
    if args.image is None:
        image, mask = demo_inputs(args.width or 512, args.height or 512)
        print("No --image/--mask given: painting into a built-in demo gradient with a centred mask.")
    else:
        image, mask = args.image, args.mask

    request = FillRequest(
        prompt=args.prompt,
        image=image,
        mask=mask,
        width=args.width,
        height=args.height,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
    )
    result = engine.run(request, on_event=_StepProgress())
    paths = _output_paths(args.out, len(result.images))
    for path, picture in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    stats = result.stats
    print(f"wrote {', '.join(map(str, paths))} ({stats['width']}x{stats['height']}, seed {result.seed})")
    timings = ", ".join(f"{name} {seconds:.3f}s" for name, seconds in result.timings.items())
    print(f"timings: {timings}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fluxfill`` command."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "inpaint":
            return run_inpaint(args)
        if args.command == "bench":
            from .bench.cli import run_bench_command

            return run_bench_command(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
