"""The safety checker (``fluxfill serve --safety-checker DIR``): Stable Diffusion's NSFW classifier,
run on the outputs of requests with ``enable_safety_checker``.

The folder is laid out as Stable Diffusion checkpoints ship it: either a folder holding the two
subfolders ``safety_checker/`` (diffusers' ``StableDiffusionSafetyChecker``: ``config.json`` and the
weights) and ``feature_extractor/`` (a ``CLIPImageProcessor``: ``preprocessor_config.json``), for
example a whole SD checkpoint, or one folder holding both. Files are read locally only, and a
checkpoint that lacks any of the checker's weights is refused (they would be random: a checker that
silently passes everything).

Flagged images are replaced by black images of the same size, as diffusers' pipelines do, and the
per-image flags are reported (``has_nsfw_contents``). Where no check ran, no flag is reported (an empty
``has_nsfw_contents``: ``[False]`` would claim a check), and the task's ``safety_checker`` says why:
``"off"`` (not asked for) or ``"not configured"``: WaveSpeed's clients ask for the check by default, so on
a server without ``--safety-checker`` such a request runs unchecked and says so (also in the header
``X-Safety-Checker: not-configured``); the native API refuses (422) a check it cannot make.

torch, transformers and diffusers are imported when a checker is loaded, not when this module is.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import PIL.Image

FLAG = "--safety-checker"
MODEL_SUBFOLDER = "safety_checker"
PROCESSOR_SUBFOLDER = "feature_extractor"
MODEL_CONFIG = "config.json"
PROCESSOR_CONFIG = "preprocessor_config.json"
#: Images classified at once (CLIP ViT-L/14 at 224x224: a few hundred MB of activations in fp16).
CHUNK = 16


def resolve_folders(path: str | Path | None) -> tuple[Path, Path]:
    """``(model folder, image processor folder)`` for ``path``: its ``safety_checker/`` and
    ``feature_extractor/`` subfolders where they hold the configs, else ``path`` itself. Raises
    FileNotFoundError (no such folder) or ValueError (a config missing), naming ``--safety-checker``."""
    if path is None or str(path).strip() == "":
        raise ValueError(f"{FLAG}: give the folder of a Stable Diffusion safety checker")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{FLAG}: no such folder: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{FLAG}: {folder} is not a folder (give the folder of a safety checker)")

    def find(subfolder: str, config: str) -> Path | None:
        for candidate in (folder / subfolder, folder):
            if (candidate / config).is_file():
                return candidate
        return None

    model_dir = find(MODEL_SUBFOLDER, MODEL_CONFIG)
    processor_dir = find(PROCESSOR_SUBFOLDER, PROCESSOR_CONFIG)
    layout = (
        f"expected {MODEL_SUBFOLDER}/{MODEL_CONFIG} (with the weights) and "
        f"{PROCESSOR_SUBFOLDER}/{PROCESSOR_CONFIG}, or both files in the folder itself"
    )
    if model_dir is None:
        raise ValueError(f"{FLAG}: {folder} has no safety checker ({MODEL_CONFIG}): {layout}")
    if processor_dir is None:
        raise ValueError(f"{FLAG}: {folder} has no feature extractor ({PROCESSOR_CONFIG}): {layout}")
    return model_dir, processor_dir


def _default_dtype(device: Any) -> Any:
    import torch

    return torch.float32 if device.type == "cpu" else torch.float16


def _black(image: PIL.Image.Image) -> PIL.Image.Image:
    """A black image of ``image``'s size (and mode where black is zero in it; else RGB)."""
    import PIL.Image

    if image.mode in ("RGBA", "LA"):
        return PIL.Image.new(image.mode, image.size, (0,) * (len(image.mode) - 1) + (255,))
    if image.mode in ("RGB", "L", "I", "F", "I;16"):
        return PIL.Image.new(image.mode, image.size, 0)
    return PIL.Image.new("RGB", image.size, (0, 0, 0))


class SafetyChecker:
    """Stable Diffusion's safety checker with its CLIP image processor. Thread-safe (a lock).

    Build one with :meth:`from_folder`; :meth:`check` classifies images."""

    def __init__(self, model: Any, processor: Any, *, path: str | Path | None = None) -> None:
        self.model = model
        self.processor = processor
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, path: str | Path, device: Any = "cpu", *, dtype: Any = None) -> SafetyChecker:
        """Load the checker and its image processor from ``path`` (see :func:`resolve_folders`) onto
        ``device``. ``dtype``: float32 on a CPU, float16 on a GPU unless given.

        Raises FileNotFoundError (no such folder) or ValueError (not a usable safety checker), both
        naming ``--safety-checker``."""
        model_dir, processor_dir = resolve_folders(path)
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        device = torch.device(device)
        dtype = _default_dtype(device) if dtype is None else dtype
        try:
            model_type = json.loads((model_dir / MODEL_CONFIG).read_text()).get("model_type", "clip")
            if model_type != "clip":
                raise ValueError(f"its {MODEL_CONFIG} is a {model_type!r} model, not a CLIP safety checker")
            # With output_loading_info, from_pretrained returns (model, info); transformers types it as
            # returning the model alone.
            model, info = cast(
                "tuple[StableDiffusionSafetyChecker, dict[str, list[str]]]",
                StableDiffusionSafetyChecker.from_pretrained(
                    model_dir, local_files_only=True, output_loading_info=True
                ),
            )
            processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{FLAG}: cannot load a safety checker from {Path(path)}: {error}") from error
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(
                f"{FLAG}: {model_dir} lacks {len(missing)} of the safety checker's weights ({shown}): "
                "not a StableDiffusionSafetyChecker checkpoint"
            )
        # Seen as a Module: transformers decorates PreTrainedModel.to with functools.wraps(nn.Module.to),
        # which types it with Module.to's unbound signature (`self` first); the call still runs its own `to`.
        cast("torch.nn.Module", model).to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(model, processor, path=Path(path).expanduser())

    @property
    def device(self) -> Any:
        return self.model.device

    def check(self, images: Sequence[PIL.Image.Image]) -> tuple[list[PIL.Image.Image], list[bool]]:
        """``(images, has_nsfw_contents)``: the images with each flagged one replaced by a black image
        of its size, and one flag per image. The images given are not modified."""
        images = list(images)
        if not images:
            return [], []
        import numpy as np
        import torch

        flags: list[bool] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), CHUNK):
                chunk = [image.convert("RGB") for image in images[start : start + CHUNK]]
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
                pixels = pixels.to(device=self.model.device, dtype=self.model.dtype)
                # The checker blacks out flagged entries of `images` itself; it gets stand-ins, and the
                # PIL images are replaced below.
                stand_ins = [np.zeros(1, dtype=np.float32) for _ in chunk]
                _, has_nsfw = self.model(clip_input=pixels, images=stand_ins)
                flags.extend(bool(flag) for flag in has_nsfw)
        checked = [_black(image) if flag else image for image, flag in zip(images, flags, strict=True)]
        return checked, flags

    def __repr__(self) -> str:
        return f"SafetyChecker({str(self.path)!r})"
