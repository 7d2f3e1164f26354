"""LoRA files: the file a spec names, read through diffusers' converters (every format
``FluxFillPipeline.load_lora_weights`` reads), scaled as peft would scale it, fitted to this model's layer
shapes, and kept in an LRU cache keyed by path, size and modification time."""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputFileNotFound
from .spec import LoraLabel, LoraSpec

logger = logging.getLogger(__name__)

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# The input projection of FLUX.1 [dev] reads 64 channels; Fill's reads 384 (64 noise latents first).
# diffusers zero-pads a [dev] LoRA's A to Fill's width, so it acts on the noise latents only.
INPUT_PROJECTION = "x_embedder"


@dataclass
class LoraTerm:
    """``scale * B @ A`` on one diffusers layer."""

    down: torch.Tensor  # A [r, in]
    up: torch.Tensor  # B [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    """A LoRA file read and checked against the model: its terms per diffusers layer path."""

    path: Path
    key: tuple[str, int, int]
    terms: dict[str, LoraTerm]
    rank: int
    load_seconds: float
    ignored: list[str] = field(default_factory=list)  # parts the engine does not apply, for stats


def resolve_lora_file(spec: LoraSpec, label: LoraLabel) -> Path:
    """The ``.safetensors`` file a spec names (a folder: diffusers' file name, else its only one)."""
    path = Path(spec.path).expanduser()
    if path.is_dir():
        if (path / LORA_FILE_NAME).is_file():
            return path / LORA_FILE_NAME
        candidates = sorted(p for p in path.glob("*.safetensors") if p.is_file())
        if len(candidates) == 1:
            return candidates[0]
        found = [p.name for p in candidates] or "none"
        raise label.error(
            f"the folder holds no {LORA_FILE_NAME} and not exactly one .safetensors file "
            f"(found: {found}); name the file"
        )
    if not path.is_file():
        raise label.error(f"no such LoRA file or folder: {str(path)!r}", InputFileNotFound)
    if path.suffix.lower() != ".safetensors":
        raise label.error(
            f"only .safetensors LoRA files are read (pickled checkpoints can run code), got "
            f"{path.suffix or 'no extension'!r}"
        )
    return path


def file_key(path: Path) -> tuple[str, int, int]:
    """The cache identity of a file: resolved path, size, modification time (a rewritten file is new)."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _read_safetensors(path: Path, label: LoraLabel) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise label.error(f"not a readable .safetensors file: {err}") from None
    raw = header.get("lora_adapter_metadata")
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        raise label.error("its lora_adapter_metadata is not valid JSON") from None
    return tensors, metadata


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup (``get_pattern_key``): the first pattern that
    matches the end of the module path."""
    import re

    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_scales(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alphas: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
    label: LoraLabel,
) -> dict[str, float]:
    """``lora_alpha / r`` per module, as diffusers configures peft for this file.

    Adapter metadata (what ``save_lora_weights`` writes) is a peft ``LoraConfig``: its ``r``,
    ``lora_alpha`` and patterns decide. Otherwise network alphas (``<module>.alpha`` keys) give each
    module's alpha, the most common one standing in for modules without; without either, alpha equals
    the rank (scale 1; kohya and XLabs files have their alphas folded in by diffusers' converters).
    """
    if metadata:
        config = {
            k[len(TRANSFORMER_PREFIX) :]: v for k, v in metadata.items() if k.startswith(TRANSFORMER_PREFIX)
        }
        if config.get("use_dora"):
            raise label.error("DoRA adapters are not supported (plain LoRA only)")
        if config.get("lora_bias"):
            raise label.error("LoRAs with a bias on B are not supported")
        scales = {}
        for name, (down, _) in modules.items():
            rank = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", down.shape[0]))
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank))
            if rank != down.shape[0]:
                raise label.error(
                    f"its metadata says rank {rank} for {name}, but the weights have rank {down.shape[0]}"
                )
            root = math.sqrt(rank) if config.get("use_rslora") else rank
            scales[name] = float(alpha) / root
        return scales
    per_module = {}
    for key, value in (alphas or {}).items():
        name = key[len(TRANSFORMER_PREFIX) :] if key.startswith(TRANSFORMER_PREFIX) else None
        if name is not None and name.endswith(".alpha"):
            per_module[name[: -len(".alpha")]] = float(value)
    common = collections.Counter(per_module.values()).most_common(1)
    default_alpha = common[0][0] if common else None
    return {
        name: (per_module.get(name, default_alpha) or down.shape[0]) / down.shape[0]
        for name, (down, _) in modules.items()
    }


def read_lora_file(path: Path, label: LoraLabel) -> tuple[dict[str, LoraTerm], list[str]]:
    """The transformer's LoRA terms of a file, read through diffusers' converters (every format
    ``FluxFillPipeline.load_lora_weights`` reads), on the CPU; and the parts that are not applied."""
    from diffusers import FluxFillPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    raw, metadata = _read_safetensors(path, label)
    if not raw:
        raise label.error("the file holds no tensors")
    try:
        state_dict, alphas = FluxFillPipeline.lora_state_dict(dict(raw), return_alphas=True)
    except Exception as err:  # the converters raise what they raise; the message names the file
        raise label.error(f"diffusers cannot read it as a FLUX LoRA: {err}") from None
    norms = [k for k in state_dict if any(n in k for n in FluxFillPipeline._control_lora_supported_norm_keys)]
    if norms:
        raise label.error(
            f"a FLUX Control LoRA (it replaces norm weights such as {norms[0]!r}); it is for "
            "FLUX.1 Canny/Depth [dev], not for Fill"
        )
    ignored = sorted({k.split(".")[0] for k in state_dict if k.startswith(TEXT_ENCODER_PREFIXES)})
    transformer = {
        k[len(TRANSFORMER_PREFIX) :]: v
        for k, v in state_dict.items()
        if k.startswith(TRANSFORMER_PREFIX) and "lora" in k
    }
    if not transformer:
        sample = sorted(raw)[:3]
        raise label.error(
            f"holds no LoRA for the FLUX transformer (no 'transformer.*lora*' weights after "
            f"diffusers' conversion; first keys: {sample})"
        )
    if any(".lokr_" in k for k in transformer):
        raise label.error("a LoKr adapter; only LoRA is supported")
    if not any("lora_A" in k for k in transformer):
        transformer = convert_unet_state_dict_to_peft(transformer)
    if any("lora_magnitude_vector" in k or "dora_scale" in k for k in transformer):
        raise label.error("DoRA adapters are not supported (plain LoRA only)")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in transformer:
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            up = transformer.get(f"{name}.lora_B.weight")
            if up is None:
                raise label.error(f"{name} has lora_A but no lora_B weights")
            if f"{name}.lora_B.bias" in transformer:
                raise label.error(f"{name} has a bias on lora_B; LoRAs with biases are not supported")
            modules[name] = (transformer[key], up)
    if not modules:
        raise label.error("holds no lora_A/lora_B weight pairs for the FLUX transformer")
    scales = _module_scales(modules, alphas, metadata, label)
    terms = {}
    for name, (down, up) in modules.items():
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise label.error(f"{name} is not a linear LoRA (A {tuple(down.shape)}, B {tuple(up.shape)})")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise label.error(f"{name} has NaN or infinite weights")
        terms[name] = LoraTerm(down, up, scales[name])
    return terms, ignored


def fit_to_model(
    terms: dict[str, LoraTerm], shapes: Mapping[str, tuple[int, int]], max_rank: int, label: LoraLabel
) -> dict[str, LoraTerm]:
    """Check every term against this model's layer shapes ``{path: (in, out)}``; a FLUX.1 [dev] input
    projection LoRA is zero-padded to Fill's width, as diffusers does. ``ValueError`` naming the layer
    otherwise (a LoRA for another model), never a shape error later."""
    fitted = {}
    for name, term in terms.items():
        if name not in shapes:
            raise label.error(
                f"a LoRA for another model: it targets {name!r}, which this FLUX Fill "
                "transformer does not have (or whose LoRA the engine does not apply)"
            )
        in_features, out_features = shapes[name]
        rank, lora_in, lora_out = term.rank, term.down.shape[1], term.up.shape[0]
        if lora_out != out_features or lora_in > in_features:
            raise label.error(
                f"a LoRA for another model: {name} maps {lora_in} -> {lora_out} features, this "
                f"model's layer maps {in_features} -> {out_features}"
            )
        down = term.down
        if lora_in < in_features:
            if name != INPUT_PROJECTION:
                raise label.error(
                    f"a LoRA for another model: {name} reads {lora_in} features, this model's "
                    f"layer reads {in_features}"
                )
            down = F.pad(down, (0, in_features - lora_in))  # a FLUX.1 [dev] LoRA: noise latents only
        if rank > max_rank:
            raise label.error(
                f"rank {rank} at {name} is above EngineConfig.max_lora_rank={max_rank}; raise it "
                "(the compiled side path pads every LoRA to it)"
            )
        fitted[name] = LoraTerm(down, term.up, term.scale)
    return fitted


class LoraCache:
    """Loaded LoRA files, least recently used dropped first; keyed by :func:`file_key`, so a file
    rewritten in place is read again. Thread-safe: requests may load while another one runs."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._files: collections.OrderedDict[tuple[str, int, int], LoraFile] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._files)

    def load(
        self,
        spec: LoraSpec,
        label: LoraLabel,
        shapes: Mapping[str, tuple[int, int]],
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[LoraFile, bool]:
        """The file of ``spec``, checked against ``shapes``, on ``device`` in ``dtype``; and whether it
        came from the cache."""
        path = resolve_lora_file(spec, label)
        key = file_key(path)
        with self._lock:
            cached = self._files.get(key)
            if cached is not None:
                self._files.move_to_end(key)
        if cached is not None:
            for name, term in cached.terms.items():  # the rank limit may have changed since
                if term.rank > max_rank:
                    fit_to_model({name: term}, shapes, max_rank, label)
            sample = next(iter(cached.terms.values())).down
            if (sample.device, sample.dtype) != (torch.device(device), dtype):  # the pipeline moved or cast
                cached.terms = {
                    n: LoraTerm(t.down.to(device, dtype), t.up.to(device, dtype), t.scale)
                    for n, t in cached.terms.items()
                }
            return cached, True
        start = time.perf_counter()
        terms, ignored = read_lora_file(path, label)
        if ignored:
            logger.warning(
                "%s: its %s weights are not applied (the engine applies LoRAs to the transformer only; "
                "diffusers' pipe.load_lora_weights applies them to the text encoder too)",
                label,
                " and ".join(ignored),
            )
        terms = fit_to_model(terms, shapes, max_rank, label)
        terms = {
            name: LoraTerm(t.down.to(device, dtype), t.up.to(device, dtype), t.scale)
            for name, t in terms.items()
        }
        loaded = LoraFile(
            path=path,
            key=key,
            terms=terms,
            rank=max(t.rank for t in terms.values()),
            load_seconds=time.perf_counter() - start,
            ignored=ignored,
        )
        with self._lock:
            self._files[key] = loaded
            self._files.move_to_end(key)
            while len(self._files) > self.capacity:
                self._files.popitem(last=False)
        return loaded, False

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
