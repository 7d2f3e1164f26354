"""A saved engine: the transformer's weights as the engine runs them, a manifest, the compile cache and
the other components, in one folder that loads without quantizing or recompiling.

Layout of ``DIR``::

    fluxfill-engine.json          the manifest (format, configuration, model config, versions, device kind)
    transformer/config.json       the diffusers transformer's config
    transformer/engine.safetensors  the engine transformer's state dict: fused QKV (and QKV+MLP-in),
                                  the whole input projection, quantized linears as their fp8/int8 values
                                  (``weight_bits``, uint8/int8) and fp32 per-row scales (``scale_bits``)
    compile-cache/                Inductor's artifacts (``torch.compiler.save_cache_artifacts``) when
                                  the saving engine compiled, loaded before compiling
    model_index.json, scheduler/, vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/
                                  the other components, saved by their own ``save_pretrained``

The other components are saved beside, not referenced: the folder is the whole model, movable and
independent of the folder it was prepared from (at FLUX.1's size the VAE and text encoders are ~10 GB
of the ~16 GB; a reference would save that but break when the original moves).

Loading builds the transformer on the meta device, reads ``engine.safetensors`` straight onto the
target device and assigns its tensors (:func:`~.checkpoints.materialise`): the only weight bytes read
are the file's, and nothing is made in another dtype first. A manifest that does not match what is
asked (format version, the fields that decide the weights: ``dtype``, ``quant``, ``quant_backend``,
and the device kind) is refused with a message naming each difference. Other versions of torch or
diffusers load the weights, without the compile cache (it is keyed to the torch build).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (
    check_state,
    is_fp8_checkpoint,
    materialise,
    meta_engine_transformer,
    read_fp8_checkpoint,
)
from .compilation import CACHE_FILE, save_compile_cache
from .config import EngineConfig, parse_dtype
from .errors import InputError, InputFileNotFound
from .pipeline import FluxFillPipeline
from .quantization import QuantPlan, resolve
from .runtime import runtime_of

logger = logging.getLogger(__name__)

MANIFEST = "fluxfill-engine.json"
FORMAT = "fluxfill-saved-engine"
FORMAT_VERSION = 1
WEIGHTS = Path("transformer") / "engine.safetensors"
COMPILE_CACHE = "compile-cache"
COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# The configuration fields whose value is in the saved bytes; the others may change at load.
WEIGHT_FIELDS = ("dtype", "quant", "quant_backend")


def device_kind(device: torch.device) -> str:
    """What a saved engine is prepared for: ``cpu``, or the GPU's name and compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm{major}{minor}"
    return device.type


def versions() -> dict[str, str]:
    import diffusers
    import safetensors
    import transformers

    return {
        "fluxfill_engine": importlib.metadata.version("fluxfill-engine"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def is_saved_engine(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a saved engine's manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a saved engine, its format checked."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(
            f"`model`: cannot read the saved engine's manifest {str(path)!r}: {err}", "model"
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"`model`: {str(path)!r} is not a fluxfill saved-engine manifest", "model")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"`model`: the saved engine {str(directory)!r} has format version {manifest.get('format_version')}, "
            f"this fluxfill-engine reads version {FORMAT_VERSION}: prepare it again with this version",
            "model",
        )
    return manifest


def save_engine(pipeline: FluxFillPipeline, directory: str | Path) -> dict[str, Any]:
    """Write the configured pipeline as a saved engine in ``directory`` (new or empty); the manifest.

    Refused (``ValueError``): a quantized T5 (its quantized layers have no diffusers format: save with
    ``quantize_text_encoder=False``, it can be switched on at load), another quantization backend than
    the native one (torchao/quanto tensors), a folder that is not empty.
    """
    config = pipeline.engine_config
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"`directory`: {str(target)!r} exists and is not an empty folder", "directory")
    if config.quantize_text_encoder:
        raise InputError(
            "a saved engine keeps the text encoders in their diffusers format: save from an engine with "
            "quantize_text_encoder=False (the saved engine can switch it on at load)",
            "quantize_text_encoder",
        )
    fill = pipeline.engine_transformer()
    plan = fill.quant_plan
    if plan is not None and plan.backend != "native":
        raise InputError(
            f"a saved engine stores the native backend's quantized layers, not {plan.backend}'s: "
            "use quant_backend='native' or 'auto'",
            "quant_backend",
        )
    fill.lora.reset()  # a merged LoRA set is taken out: the saved weights are the base model's
    from safetensors.torch import save_file

    state = {key: tensor.detach().contiguous().cpu() for key, tensor in fill.state_dict().items()}
    (target / WEIGHTS.parent).mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / WEIGHTS), metadata={"format": FORMAT})
    transformer = pipeline.transformer
    transformer.save_config(str(target / WEIGHTS.parent))
    component_dtypes = {}
    for name in COMPONENTS:
        component = getattr(pipeline, name, None)
        if component is None:
            continue
        component.save_pretrained(str(target / name))
        dtype = getattr(component, "dtype", None)
        if isinstance(dtype, torch.dtype):
            component_dtypes[name] = str(dtype).replace("torch.", "")
    pipeline.save_config(str(target))  # model_index.json: each component's library and class
    compile_cache = None
    if fill.compile_settings is not None:
        compile_cache = save_compile_cache(target / COMPILE_CACHE)
        if compile_cache is not None:
            compile_cache["path"] = str(Path(COMPILE_CACHE) / CACHE_FILE)
    device = fill.proj_out.weight.device
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": {key: value for key, value in config.describe().items() if key != "compile_cache_dir"},
        "quant_plan": None if plan is None else dataclasses.asdict(plan),
        "weights": {
            "file": WEIGHTS.as_posix(),
            "bytes": (target / WEIGHTS).stat().st_size,
            "tensors": len(state),
            "dtype": str(transformer.dtype).replace("torch.", ""),
        },
        "component_dtypes": component_dtypes,
        "model": {key: value for key, value in dict(transformer.config).items() if not key.startswith("_")},
        "device_kind": device_kind(device),
        "compile_cache": compile_cache,
        "compiled_with": None if fill.compile_settings is None else list(fill.compile_settings),
        "versions": versions(),
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def _config_differences(saved: EngineConfig, asked: EngineConfig) -> list[str]:
    return [
        f"{name}: saved {getattr(saved, name)!r}, asked {getattr(asked, name)!r}"
        for name in WEIGHT_FIELDS
        if getattr(saved, name) != getattr(asked, name)
    ]


def load_saved_engine(
    directory: str | Path,
    config: EngineConfig | None = None,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
) -> tuple[FluxFillPipeline, EngineConfig]:
    """The pipeline of a saved engine, with its engine transformer installed, and the configuration
    to run it with (the saved one, or ``config`` when its weight fields agree; runtime fields such as
    ``attention``, ``compile`` or the step cache may differ). ``ValueError`` naming what differs."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    known = {field.name for field in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(manifest["config"]) - known)
    if unknown:
        raise InputError(
            f"`model`: the saved engine {str(directory)!r} was saved with configuration fields this "
            f"fluxfill-engine does not have ({', '.join(unknown)}): load it with the version that saved it "
            f"({manifest['versions'].get('fluxfill_engine')}) or prepare it again",
            "model",
        )
    saved = EngineConfig(**manifest["config"])
    asked = config or saved
    target = torch.device(device) if device is not None else torch.device("cpu")
    differences = _config_differences(saved, asked)
    dtype = parse_dtype(torch_dtype, "torch_dtype")
    if dtype is not None and str(dtype).replace("torch.", "") != manifest["weights"]["dtype"]:
        differences.append(f"torch_dtype: saved {manifest['weights']['dtype']!r}, asked {str(dtype)!r}")
    kind = device_kind(target)
    if kind != manifest["device_kind"]:
        differences.append(f"device kind: prepared for {manifest['device_kind']!r}, loading on {kind!r}")
    if differences:
        raise InputError(
            f"`model`: the saved engine {str(directory)!r} does not match what is asked ("
            + "; ".join(differences)
            + "): load it with the configuration it was saved with (no config; on the command line the "
            "same --preset and --dtype as `fluxfill prepare`), or prepare it again for this one and this device",
            "model",
        )
    if (
        asked.compile
        and asked.compile_cache_dir is None
        and (directory / COMPILE_CACHE / CACHE_FILE).is_file()
    ):
        if manifest["versions"].get("torch") == torch.__version__:
            asked = dataclasses.replace(asked, compile_cache_dir=str(directory / COMPILE_CACHE))
        else:
            logger.warning(
                "the saved engine's compile cache is from torch %s, this is torch %s: not loaded",
                manifest["versions"].get("torch"),
                torch.__version__,
            )
    plan = None if manifest["quant_plan"] is None else QuantPlan(**manifest["quant_plan"])
    transformer, fill = meta_engine_transformer(manifest["model"], plan)
    from safetensors.torch import load_file

    state = load_file(str(directory / WEIGHTS), device=str(target))
    check_state(state, fill.state_dict(), f"the saved engine's {WEIGHTS.as_posix()}")
    materialise(transformer, fill, state)
    dtypes = {name: getattr(torch, value) for name, value in manifest["component_dtypes"].items()}
    pipeline = FluxFillPipeline.from_pretrained(
        str(directory), transformer=transformer, dtype={"default": torch.float32, **dtypes}
    )
    _install(pipeline, fill, asked)
    return pipeline, asked


def _install(pipeline: FluxFillPipeline, fill: Any, config: EngineConfig) -> None:
    """Make ``fill`` the pipeline's engine transformer for ``config``, as if it had been built and
    quantized there (the runtime never rebuilds a quantized one, and skips what is done)."""
    runtime = runtime_of(pipeline.transformer)
    runtime._fill = fill
    pipeline._engine_config = config  # configure(config) then finds nothing to quantize, only to compile


def load_fp8_checkpoint(
    path: str | Path,
    base: str | Path | None,
    config: EngineConfig,
    device: str | torch.device | None = None,
) -> tuple[FluxFillPipeline, EngineConfig]:
    """The pipeline for a community fp8 single file (BFL layout, see :mod:`.checkpoints`) with the
    components and transformer config of ``base``; its block linears run as the engine's fp8 layers.

    ``config.quant`` must be ``fp8`` or ``fp8-weight`` with the native or auto backend. ``fp8`` where
    W8A8 does not run (no fp8 tensor cores: ``auto`` would choose int8) runs ``fp8-weight``: the file's
    bytes, dequantized at the matmul, rather than a second quantization to int8.
    """
    if base is None:
        raise InputError(
            "`base` is required with a single-file `model`: a diffusers FLUX.1 Fill folder that provides "
            "the text encoders, VAE, scheduler and the transformer's config",
            "base",
        )
    base = Path(base)
    if not (base / "model_index.json").is_file():
        raise InputFileNotFound(
            f"`base`: {str(base)!r} is not a diffusers folder (no model_index.json)", "base"
        )
    if config.quant not in ("fp8", "fp8-weight") or config.quant_backend not in ("auto", "native"):
        raise InputError(
            f"`model`: {str(path)!r} holds fp8 weights; run it with quant='fp8' or 'fp8-weight' and the "
            f"native or auto backend (preset fast), not quant={config.quant!r} with "
            f"quant_backend={config.quant_backend!r}",
            "quant",
        )
    target = torch.device(device) if device is not None else torch.device("cpu")
    plan = resolve(config.quant, config.quant_backend, target)
    if not plan.mode.startswith("fp8"):
        plan = QuantPlan(
            "fp8-weight", "native", f"fp8 checkpoint, no fp8 W8A8 on {target}: dequantized matmuls"
        )
    dtype = config.torch_dtype or torch.float32  # as diffusers loads a folder without a dtype
    model_config = json.loads((base / "transformer" / "config.json").read_text())
    transformer, fill = meta_engine_transformer(model_config, plan)
    state = read_fp8_checkpoint(path, fill.state_dict(), dtype, target)
    check_state(state, fill.state_dict(), f"{str(path)!r}")
    materialise(transformer, fill, state)
    pipeline = FluxFillPipeline.from_pretrained(str(base), transformer=transformer, dtype=dtype)
    _install(pipeline, fill, config)
    return pipeline, config


def load_prepared(
    model: str | Path,
    base: str | Path | None,
    config: EngineConfig | None,
    device: str | torch.device | None,
    torch_dtype: str | torch.dtype | None,
) -> tuple[FluxFillPipeline, EngineConfig] | None:
    """A saved engine or an fp8 single file as a pipeline with its engine transformer already
    installed, and the configuration to run; ``None`` for anything else (loaded the usual way)."""
    if is_saved_engine(model):
        return load_saved_engine(model, config, device, torch_dtype)
    if is_fp8_checkpoint(model):
        config = config or EngineConfig.preset("reference")
        if torch_dtype is not None:
            config = dataclasses.replace(config, dtype=str(parse_dtype(torch_dtype)).replace("torch.", ""))
        return load_fp8_checkpoint(model, base, config, device)
    return None
