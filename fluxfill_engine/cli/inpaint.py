"""``fluxfill inpaint``: repaint the white part of a mask from a prompt and write PNG file(s).

Without ``--model`` it runs the built-in tiny random-weight model (the output is noise; the point is
that the whole path runs). Without ``--image``/``--mask`` it paints into a built-in demo image.
Everything a user can get wrong is checked before the model loads, in one line naming the option.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..limits import MAX_IMAGES, MAX_LORA_SCALE, MAX_LORAS, MAX_SIZE, MAX_STEPS, MIN_SIZE
from .model_args import add_model_arguments, resolve_model_arguments
from .output import check_output

if TYPE_CHECKING:
    from ..engine import Event


def _outpaint(text: str) -> dict[str, int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--outpaint takes four pixel counts L,T,R,B, got {text!r}")
    return dict(zip(("left", "top", "right", "bottom"), values, strict=True))


def _lora_option(text: str) -> dict[str, Any]:
    """``PATH[:SCALE]`` -> ``{"path", "scale"}``; a colon not followed by a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "scale": float(tail)}
        except ValueError:
            pass
    return {"path": text, "scale": 1.0}


def add_inpaint_parser(commands: Any) -> None:
    """Add the ``inpaint`` subcommand to ``fluxfill``'s subparsers."""
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
        "--steps", type=int, default=28, help=f"denoising steps, 1-{MAX_STEPS} (default: 28)"
    )
    inpaint.add_argument("--guidance", type=float, default=30.0, help="guidance scale, 0-100 (default: 30)")
    inpaint.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    inpaint.add_argument(
        "--width", type=int, help=f"output width, {MIN_SIZE}-{MAX_SIZE}, with --height (default: the image's)"
    )
    inpaint.add_argument(
        "--height",
        type=int,
        help=f"output height, {MIN_SIZE}-{MAX_SIZE}, with --width (default: the image's)",
    )
    inpaint.add_argument("--num-images", type=int, default=1, help=f"images, 1-{MAX_IMAGES} (default: 1)")
    fill = inpaint.add_argument_group("fill options")
    fill.add_argument(
        "--no-paste-back",
        dest="paste_back",
        action="store_false",
        help="keep the model's whole picture (default: outside the mask the output is the input's pixels)",
    )
    fill.add_argument("--mask-grow", type=int, default=0, help="dilate the mask by N pixels (default: 0)")
    fill.add_argument(
        "--mask-blur", type=int, default=0, help="feather the paste-back seam over N pixels (default: 0)"
    )
    fill.add_argument(
        "--soft-mask",
        action="store_true",
        help="grey mask levels reach the model (default: threshold at half)",
    )
    fill.add_argument(
        "--crop-to-mask",
        action="store_true",
        help="repaint only the box around the mask (with --crop-padding pixels of context), then stitch it in",
    )
    fill.add_argument(
        "--crop-padding", type=int, default=64, help="context around the mask's box (default: 64)"
    )
    fill.add_argument(
        "--outpaint",
        type=_outpaint,
        metavar="L,T,R,B",
        help="grow the canvas by these pixels (left, top, right, bottom) and fill the new area; --mask optional",
    )
    fill.add_argument(
        "--max-megapixels",
        type=float,
        default=1.0,
        help="working resolution when the engine chooses it (default: 1.0, FLUX's training resolution)",
    )
    inpaint.add_argument(
        "--lora",
        dest="loras",
        action="append",
        type=_lora_option,
        metavar="PATH[:SCALE]",
        help=f"a LoRA (.safetensors file, or a folder with diffusers' LoRA file) and its scale, "
        f"-{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (default 1); repeat for up to {MAX_LORAS}",
    )
    add_model_arguments(inpaint)
    inpaint.add_argument(
        "--context-parallel",
        type=int,
        metavar="N",
        help="split the image's tokens over N processes (Ulysses), one GPU each, for one image's latency: "
        "launch as `torchrun --nproc-per-node N -m fluxfill_engine.cli inpaint ...`; rank 0 writes the "
        "output (default: torchrun's process count, else 1)",
    )
    inpaint.set_defaults(run=run_inpaint)


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


# The option that sets each FillRequest field, so a refused value names what the user typed.
_FIELD_OPTIONS = {
    "prompt": "--prompt",
    "image": "--image",
    "mask": "--mask",
    "width": "--width",
    "height": "--height",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "seed": "--seed",
    "num_images": "--num-images",
    "mask_grow": "--mask-grow",
    "mask_blur": "--mask-blur",
    "crop_padding": "--crop-padding",
    "outpaint": "--outpaint",
    "max_megapixels": "--max-megapixels",
    "loras": "--lora",
}


def _refused_field(err: Exception) -> str | None:
    """The request field ``err`` refuses, as ``FillRequest`` spells it (``loras[1].scale`` -> ``loras``)."""
    if not isinstance(err, InputError) or err.field is None:
        return None
    return re.split(r"[.\[]", err.field, maxsplit=1)[0]


def _naming_the_option(err: Exception) -> Exception:
    """``err`` with its message prefixed by the option that sets the refused field (when one does)."""
    option = _FIELD_OPTIONS.get(_refused_field(err) or "")
    if option is None:
        return err
    if isinstance(err, InputError):
        return type(err)(f"{option}: {err.message}", field=err.field)
    return type(err)(f"{option}: {err}")


def _context_parallel(requested: int | None, device: str) -> tuple[int, str, bool]:
    """``--context-parallel``: the degree (default: torchrun's process count, else 1), this rank's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``) and whether this process prints and writes (rank 0)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    degree = world if requested is None else requested
    command = f"-m fluxfill_engine.cli inpaint --context-parallel {degree}"
    launch = f"`torchrun --nproc-per-node {degree} {command} ...`"
    if degree < 1:
        raise ValueError(f"--context-parallel must be >= 1, got {degree}")
    if degree == 1 and world == 1:
        return 1, device, True
    if degree != world:
        raise ValueError(
            f"--context-parallel {degree}, but {world} process(es) were started: launch as {launch}"
        )
    from ..parallel import init_distributed, is_main_process, local_rank

    if not init_distributed():
        raise ValueError(f"--context-parallel {degree} needs {degree} processes: launch as {launch}")
    return degree, f"cuda:{local_rank()}" if device == "cuda" else device, is_main_process()


def run_inpaint(args: argparse.Namespace) -> int:
    """Run ``fluxfill inpaint``: check every argument, load the model, write the images (rank 0 only
    under torchrun). Returns the exit status; a refused argument raises ``ValueError`` naming it."""
    if args.mask is not None and args.image is None:
        raise ValueError("--mask: give --image too (or neither, for the built-in demo inputs)")
    if args.image is not None and args.mask is None and args.outpaint is None:
        raise ValueError("--image: give --mask too (it is optional only with --outpaint)")
    for option, path in (("--image", args.image), ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise ValueError(f"{option}: no such image file: {str(path)!r}")
    paths = check_output(args.out, args.num_images)
    model = resolve_model_arguments(args)
    degree, device, main_process = _context_parallel(args.context_parallel, model.device)
    say = print if main_process else (lambda *_: None)  # under torchrun: rank 0 speaks and writes
    from ..engine import FillRequest, FluxFillEngine
    from ..lora import LoraSpec, lora_label, resolve_lora_file
    from ..testing.demo import demo_inputs, tiny_engine

    config = model.engine_config(context_parallel=degree)
    if args.image is None:
        image, mask = demo_inputs(512, 512)
        say("No --image/--mask given: painting into a built-in demo gradient with a centred mask.")
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
        paste_back=args.paste_back,
        mask_grow=args.mask_grow,
        mask_blur=args.mask_blur,
        soft_mask=args.soft_mask,
        max_megapixels=args.max_megapixels,
        crop_to_mask=args.crop_to_mask,
        crop_padding=args.crop_padding,
        outpaint=args.outpaint,
        loras=args.loras,
    )
    try:
        request = request.validated(config.max_input_megapixels, config.max_loras)
        for index, spec in enumerate(request.loras or ()):  # the files exist: before the model loads
            if not isinstance(spec, LoraSpec):  # validated() turns every LoRA into a LoraSpec
                raise RuntimeError(f"a checked request holds an unchecked LoRA: {spec!r}")
            resolve_lora_file(spec, lora_label(index, spec))
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise _naming_the_option(err) from None
    if degree > 1:  # every rank must draw the same noise: rank 0's seed
        from ..parallel import broadcast_seed

        if request.seed is None:  # validated() chooses one
            raise RuntimeError("a checked request has no seed")
        request.seed = broadcast_seed(request.seed)
    if model.model is None:
        say("No --model given: running the built-in tiny random-weight model. Its output is noise;")
        say("the point is that every stage of the real path runs.")
        engine = tiny_engine(config, device=device)
    else:
        say(f"Loading {model.model} ...")
        engine = FluxFillEngine.from_pretrained(model.model, config=config, device=device, base=model.base)
    try:
        result = engine.run(request, on_event=_StepProgress() if main_process else None)
    except (ValueError, TypeError, FileNotFoundError) as err:  # a LoRA that does not fit the model
        raise _naming_the_option(err) from None
    if not main_process:
        return 0
    for path, picture in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    stats = result.stats
    (width, height), (work_w, work_h) = stats["output_size"], stats["working_size"]
    parallel = f", context parallel over {degree} processes" if degree > 1 else ""
    written = ", ".join(map(str, paths))
    print(f"wrote {written} ({width}x{height}, worked at {work_w}x{work_h}, seed {result.seed}{parallel})")
    timings = ", ".join(f"{name} {seconds:.3f}s" for name, seconds in result.timings.items())
    print(f"timings: {timings}")
    loras = stats.get("loras") or {}
    adapters = loras.get("adapters") or []
    if adapters:
        names = ", ".join(f"{a.get('name')} x{a.get('scale', 1.0):g}" for a in adapters)
        load = loras.get("load_seconds", 0.0)
        print(f"loras: {names} ({loras.get('strategy')}, load {load:.3f}s)")
    return 0
