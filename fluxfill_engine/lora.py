"""LoRA on the engine transformer: read every format diffusers reads, apply to the engine's own layers.

A LoRA adds ``scale * B @ A`` to a linear layer's weight (``A [r, in]``, ``B [out, r]``). The engine's
layers are not diffusers' one-for-one: ``to_q``/``to_k``/``to_v`` (and ``proj_mlp`` in single-stream
blocks) are one fused GEMM, so a LoRA on those sources becomes one on the fused layer: the ``A`` of
every source stacked (one GEMM for all of them) and each source's ``B`` writing only its own output
rows (a block-diagonal ``B``, computed block by block so the zeros cost nothing).

Where sets come from:

- **Files** (``FillRequest.loras``, :meth:`FluxFillPipeline.set_engine_loras`): read with diffusers'
  own ``FluxFillPipeline.lora_state_dict`` (its converters: diffusers/peft, kohya, XLabs, BFL, ...),
  scales as peft would set them (``alpha / r`` from the file's network alphas or adapter metadata),
  FLUX.1 [dev] LoRAs expanded to Fill's 384-channel input projection as diffusers does, checked
  against this model's layer shapes, cached (LRU keyed by path, size and modification time).
- **diffusers' mixin** (``pipe.load_lora_weights`` etc.): the peft layers' active adapters, their
  ``scaling`` (``set_adapters`` weights included), the call's ``joint_attention_kwargs["scale"]``,
  enable/disable and fused state are read at every call, so the engine runs diffusers' numerics.

How a set runs (:class:`LoraController`), ``EngineConfig.lora_strategy``:

- ``merge``: ``W <- W0 + sum_i s_i B_i A_i`` written into the weights (computed in float32; a native
  quantized layer is re-quantized row by row from its pristine quantized values). No per-step cost; a
  switch costs one pass over the touched layers. ``W0`` is copied to host memory before the first
  write and copied back on the next switch, so switching never drifts the base weights; the copies
  are dropped when the engine returns to the base model.
- ``side``: ``y = base(x) + (x A^T * s) B^T`` beside the (possibly quantized) base matmul; the base
  weights are never written. A per-step cost, no switch cost beyond copying the LoRA weights into the
  side path's buffers. Inside compiled blocks every layer gets the side path with every slot's rank
  padded to ``EngineConfig.max_lora_rank`` and the scales held as tensors, so switching sets changes
  tensor values only and compiles nothing new.
- ``auto`` (default): ``merge`` on an unquantized transformer; ``side`` on a quantized one, where a
  merge would round the LoRA's small update to the base's 8-bit grid (and re-quantize on every switch).

diffusers' adapters always run as a side path (diffusers' own unmerged numerics, and ``unload``
needs nothing restored).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import numbers
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LORA_STRATEGIES
from .errors import InputError, InputFileNotFound, InputTypeError
from .limits import MAX_LORA_SCALE
from .quantization import QuantizedLinear, quantize_rows

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

    from .quantization import QuantPlan

logger = logging.getLogger(__name__)

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# The input projection of FLUX.1 [dev] reads 64 channels; Fill's reads 384 (64 noise latents first).
# diffusers zero-pads a [dev] LoRA's A to Fill's width, so it acts on the noise latents only.
INPUT_PROJECTION = "x_embedder"


# ---- what a request asks for -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a request: a local ``.safetensors`` file (or a folder holding diffusers'
    ``pytorch_lora_weights.safetensors``) and its strength.

    ``scale`` multiplies the LoRA's update (1.0: as trained; 0: off; negative values invert it),
    finite, within ``[-MAX_LORA_SCALE, MAX_LORA_SCALE]`` (4).
    """

    path: str | Path
    scale: float = 1.0


@dataclass(frozen=True)
class LoraLabel:
    """How errors name one LoRA of a request: ``text`` in messages (its place and path), ``field`` as
    :class:`~.errors.InputError` carries it (``loras[1]``)."""

    text: str
    field: str | None = None

    def __str__(self) -> str:
        return self.text

    def error(self, message: str, kind: type[InputError] = InputError) -> InputError:
        """``kind`` of error about this LoRA: ``"<text>: <message>"``, with its field."""
        return kind(f"{self.text}: {message}", self.field)


def lora_label(index: int, spec: LoraSpec) -> LoraLabel:
    """How errors name a LoRA: its place in the request and its path."""
    return LoraLabel(f"`loras[{index}]` ({str(spec.path)!r})", f"loras[{index}]")


def check_lora_specs(loras: Any, max_loras: int) -> tuple[LoraSpec, ...]:
    """``loras`` as checked :class:`LoraSpec` objects: a list of specs, ``{"path", "scale"}`` dicts or
    paths, at most ``max_loras``, each scale finite in ``[-4, 4]``. Files are not opened here."""
    if loras is None:
        return ()
    if isinstance(loras, (str, Path, Mapping, LoraSpec)) or not isinstance(loras, Sequence):
        raise InputTypeError(
            f'`loras` must be a list of {{"path": ..., "scale": ...}} dicts or LoraSpec objects, got {loras!r}',
            "loras",
        )
    if len(loras) > max_loras:
        raise InputError(
            f"`loras`: {len(loras)} LoRAs given, at most {max_loras} are accepted (EngineConfig.max_loras)",
            "loras",
        )
    specs = []
    for index, item in enumerate(loras):
        field = f"loras[{index}]"
        where = f"`{field}`"
        if isinstance(item, LoraSpec):
            spec = item
        elif isinstance(item, (str, Path)):
            spec = LoraSpec(item)
        elif isinstance(item, Mapping):
            unknown = sorted(set(item) - {"path", "scale"})
            if unknown:
                raise InputError(
                    f"{where}: unknown keys {unknown}; a LoRA is {{'path': ..., 'scale': ...}}", field
                )
            if "path" not in item:
                raise InputError(f"{where}: a LoRA needs a 'path' (a .safetensors file or a folder)", field)
            spec = LoraSpec(item["path"], item.get("scale", 1.0))
        else:
            raise InputTypeError(
                f"{where} must be a dict, a LoraSpec or a path, got {type(item).__name__}", field
            )
        if not isinstance(spec.path, (str, Path)) or not str(spec.path):
            raise InputTypeError(
                f"{where}.path must be a non-empty str or Path, got {spec.path!r}", f"{field}.path"
            )
        scale = spec.scale
        finite = isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)
        if not finite or abs(scale) > MAX_LORA_SCALE:
            raise InputError(
                f"{where}.scale must be a finite number in [{-MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], "
                f"got {scale!r} (LoRA {str(spec.path)!r})",
                f"{field}.scale",
            )
        specs.append(LoraSpec(spec.path, float(scale)))
    return tuple(specs)


# ---- the model side: where a diffusers layer's LoRA lands in the engine ----------------------------


@dataclass(eq=False)
class LoraSlot:
    """One engine linear layer a LoRA can touch: ``getattr(owner, attr)``.

    ``sources`` are the diffusers module paths it computes, in output-row order (three or four for a
    fused layer), ``rows`` their output rows. ``in_block``: it runs inside a (possibly compiled) block.
    """

    key: str
    owner: nn.Module
    attr: str
    sources: tuple[str, ...]
    rows: tuple[tuple[int, int], ...]
    in_features: int
    in_block: bool

    @property
    def layer(self) -> nn.Module:
        return getattr(self.owner, self.attr)

    @property
    def base(self) -> nn.Module:
        return base_layer(self.layer)


def base_layer(module: nn.Module) -> nn.Module:
    """The plain layer under the engine's side path and under a peft LoRA wrapper."""
    while True:
        if isinstance(module, LoraLinear):
            module = module.base
        elif hasattr(module, "base_layer") and hasattr(module, "lora_A"):  # peft's LoraLayer
            module = module.get_base_layer()
        else:
            return module


# ---- files -----------------------------------------------------------------------------------------


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


# ---- sets ------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """One LoRA of a set: its terms with their final scales (module scale x the adapter's scale)."""

    name: str
    scale: float
    terms: dict[str, LoraTerm]

    @property
    def rank(self) -> int:
        return max((t.rank for t in self.terms.values()), default=0)


@dataclass
class AdapterSet:
    """The LoRAs one call runs. ``key`` identifies a set whose tensors never change (files), so the
    same set twice in a row costs nothing; ``None`` means "read again every call" (diffusers' adapters,
    whose weights and scales can change in place)."""

    adapters: list[Adapter]
    key: tuple | None
    source: str  # "request" (files) or "diffusers" (peft adapters)
    files: list[tuple[LoraFile, bool]] = field(default_factory=list)  # (file, came from the cache)

    def scaled(self, factor: float) -> AdapterSet:
        """The set with every adapter's strength multiplied by ``factor`` (a call's LoRA scale)."""
        if factor == 1.0:
            return self
        adapters = [
            Adapter(
                a.name,
                a.scale * factor,
                {k: LoraTerm(t.down, t.up, t.scale * factor) for k, t in a.terms.items()},
            )
            for a in self.adapters
        ]
        key = None if self.key is None else (self.key, factor)
        return AdapterSet(adapters, key, self.source, self.files)

    def describe(self) -> list[dict[str, Any]]:
        described = []
        for index, adapter in enumerate(self.adapters):
            info: dict[str, Any] = {
                "name": adapter.name,
                "scale": adapter.scale,
                "rank": adapter.rank,
                "layers": len(adapter.terms),
            }
            if index < len(self.files):
                loaded, cached = self.files[index]
                info.update(
                    cached=cached,
                    load_seconds=0.0 if cached else loaded.load_seconds,
                    ignored=loaded.ignored,
                )
            described.append(info)
        return described


def file_set(specs: Sequence[LoraSpec], files: Sequence[tuple[LoraFile, bool]]) -> AdapterSet:
    """The set of a request's files with the request's scales."""
    adapters = []
    for spec, (loaded, _) in zip(specs, files, strict=True):
        terms = {k: LoraTerm(t.down, t.up, t.scale * spec.scale) for k, t in loaded.terms.items()}
        adapters.append(Adapter(str(spec.path), spec.scale, terms))
    key = tuple((loaded.key, spec.scale) for spec, (loaded, _) in zip(specs, files, strict=True))
    return AdapterSet(adapters, key, "request", list(files))


def peft_adapter_set(transformer: FluxTransformer2DModel, call_scale: float = 1.0) -> AdapterSet | None:
    """diffusers' adapters on ``transformer`` as the set a forward of the diffusers module would run
    now: active, not fused into the weights, with peft's ``scaling`` x the call's LoRA scale.
    ``None`` when no adapter is loaded."""
    if not getattr(transformer, "peft_config", None):
        return None
    from peft.tuners.lora import LoraLayer

    adapters: dict[str, dict[str, LoraTerm]] = {}
    for path, module in transformer.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if module.disable_adapters:
            if module.merged:
                module.unmerge()  # what peft's forward does on a disabled layer with fused adapters
            continue
        for name in module.active_adapters:
            if name not in module.lora_A or name in module.merged_adapters:
                continue
            if module.use_dora.get(name) or module.lora_bias.get(name) or name in module.lora_variant:
                raise ValueError(
                    f"diffusers adapter {name!r} on {path} is a LoRA variant (DoRA, bias, ...) that the "
                    "engine does not run; plain LoRA only"
                )
            if not isinstance(module.lora_A[name], nn.Linear):
                raise ValueError(
                    f"diffusers adapter {name!r} on {path}: only linear-layer LoRAs are supported"
                )
            scaling = module.scaling[name]
            scaling = float(scaling.item() if isinstance(scaling, torch.Tensor) else scaling)
            term = LoraTerm(module.lora_A[name].weight, module.lora_B[name].weight, scaling * call_scale)
            adapters.setdefault(name, {})[path] = term
    return AdapterSet([Adapter(n, call_scale, t) for n, t in adapters.items()], None, "diffusers")


def resolve_strategy(requested: str, plan: QuantPlan | None) -> str:
    """``merge`` or ``side`` for ``EngineConfig.lora_strategy`` on a transformer quantized by ``plan``."""
    if requested not in LORA_STRATEGIES:
        raise ValueError(f"lora_strategy must be one of {list(LORA_STRATEGIES)}, got {requested!r}")
    if requested == "auto":
        return "merge" if plan is None else "side"
    if requested == "merge" and plan is not None and plan.backend != "native":
        raise ValueError(
            f"lora_strategy='merge' on a transformer quantized by the {plan.backend} backend is not "
            "supported (its weights cannot be re-quantized in place); use lora_strategy='side' or 'auto'"
        )
    return requested


# ---- the side path ---------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """``base`` plus a low-rank side path: ``y = base(x)``, then for each source ``s`` (output rows
    ``rows[s]``) ``y[..., rows[s]] += (x @ A_s^T * scales_s) @ B_s^T``.

    ``down`` is every source's (and every adapter's) ``A`` stacked, so one GEMM reads ``x`` for all of
    them; ``ups[s]`` is source ``s``'s ``B`` with the adapters side by side along the rank. ``scales`` is
    a tensor (one value per rank column, or ``[batch, columns]`` for different sets per sample): changing
    it, or copying new values into padded buffers, recompiles nothing.
    """

    def __init__(self, base: nn.Module, rows: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self.base = base
        self.rows = tuple(rows)
        self.widths: tuple[int, ...] = tuple(0 for _ in rows)
        self.active = False
        self.padded = False
        self.register_buffer("down", None, persistent=False)
        self.register_buffer("scales", None, persistent=False)
        for index in range(len(rows)):
            self.register_buffer(f"up{index}", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def ups(self) -> list[torch.Tensor]:
        return [getattr(self, f"up{index}") for index in range(len(self.rows))]

    def set_exact(
        self, down: torch.Tensor, ups: Sequence[torch.Tensor], widths: Sequence[int], scales: torch.Tensor
    ) -> None:
        """Buffers of exactly the set's widths (eager: no padding, nothing to skip)."""
        self.down, self.scales, self.widths, self.padded = down, scales, tuple(widths), False
        for index, up in enumerate(ups):
            setattr(self, f"up{index}", up)

    def allocate_padded(self, width: int, device: torch.device, dtype: torch.dtype) -> None:
        """Fixed buffers of ``width`` rank columns per source (compiled blocks), zero."""
        sources = len(self.rows)
        self.down = torch.zeros(sources * width, self.in_features, device=device, dtype=dtype)
        self.scales = torch.zeros(sources * width, device=device, dtype=torch.float32)
        for index, (start, end) in enumerate(self.rows):
            setattr(self, f"up{index}", torch.zeros(end - start, width, device=device, dtype=dtype))
        self.widths, self.padded = tuple(width for _ in self.rows), True

    def delta(self, x: torch.Tensor, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """The side path's output alone, for input ``x`` (``columns``: ``x`` holds only those input
        channels, as the split input projection feeds them)."""
        out = x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.down.dtype)
        self._add_side(out, x, columns)
        return out

    def _add_side(self, y: torch.Tensor, x: torch.Tensor, columns: tuple[int, int] | None = None) -> None:
        down = self.down if columns is None else self.down[:, columns[0] : columns[1]]
        hidden = F.linear(x.to(down.dtype), down)
        scales = self.scales
        if scales.dim() == 2:  # one row of scales per sample
            scales = scales.view(scales.shape[0], *([1] * (hidden.dim() - 2)), scales.shape[1])
        hidden = (hidden * scales).to(hidden.dtype)  # scales stay float32: peft multiplies by a Python float
        offset = 0
        for (start, end), up, width in zip(self.rows, self.ups(), self.widths, strict=True):
            if width:
                y[..., start:end] += F.linear(hidden[..., offset : offset + width], up).to(y.dtype)
            offset += width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.active:
            self._add_side(y, x)
        return y

    def extra_repr(self) -> str:
        return (
            f"rows={list(self.rows)}, widths={list(self.widths)}, active={self.active}, padded={self.padded}"
        )


# ---- applying a set --------------------------------------------------------------------------------


@dataclass
class _Backup:
    """A layer's pristine weights in host memory, while a merged set has written over them."""

    tensors: list[torch.Tensor]


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    copy.copy_(tensor, non_blocking=tensor.is_cuda)
    return copy


def _mergeable(base: nn.Module, key: str) -> None:
    if isinstance(base, (nn.Linear, QuantizedLinear)):
        return
    raise ValueError(
        f"lora_strategy='merge' cannot write into {key} ({type(base).__name__}); use lora_strategy='side'"
    )


def _weights_of(base: nn.Module) -> list[torch.Tensor]:
    if isinstance(base, QuantizedLinear):
        return [base.weight_bits, base.scale_bits]
    return [base.weight]


def _merge_rows(base: nn.Module, start: int, end: int, delta: torch.Tensor) -> None:
    """Rows ``[start, end)`` of ``base`` become their current (pristine) values plus ``delta`` (fp32)."""
    if isinstance(base, QuantizedLinear):
        current = base.weight_values[start:end].to(torch.float32) * base.weight_scale[start:end]
        values, scale = quantize_rows(current + delta, base.fmt)
        bits = values.view(torch.uint8) if base.fmt == "fp8" else values
        base.weight_bits[start:end].copy_(bits)
        base.scale_bits[start:end].copy_(scale.view(torch.int32))
        return
    rows = base.weight[start:end]
    rows.copy_((rows.to(torch.float32) + delta).to(rows.dtype))


class LoraController:
    """The LoRA state of one engine transformer: which set runs, how, and the pristine weights a
    merged set wrote over. :meth:`apply` switches sets; :meth:`reset` returns to the base model."""

    def __init__(self, slots: Iterable[LoraSlot]) -> None:
        self.slots = {slot.key: slot for slot in slots}
        self.by_path: dict[str, tuple[LoraSlot, int]] = {}
        for slot in self.slots.values():
            for index, source in enumerate(slot.sources):
                self.by_path[source] = (slot, index)
        self.applied_key: tuple | None = None
        self.strategy: str | None = None
        self.backups: dict[str, _Backup] = {}
        self.padded_width: int | None = None  # per-source rank columns of the compiled side path
        # Side paths taken out of the layers (the base model runs the plain layers again, the structure
        # the blocks were first compiled for, not a third one with idle wrappers), kept to be put back
        # with their buffers: a compiled slot's padded buffers are allocated once.
        self.parked: dict[str, LoraLinear] = {}

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``{diffusers layer path: (in_features, out_features)}`` of every layer a LoRA may target."""
        return {
            path: (slot.in_features, slot.rows[index][1] - slot.rows[index][0])
            for path, (slot, index) in self.by_path.items()
        }

    @property
    def active(self) -> bool:
        return self.applied_key is not None

    def _grouped(
        self, adapters: AdapterSet, device: torch.device, dtype: torch.dtype
    ) -> dict[str, list[list[tuple[int, LoraTerm]]]]:
        """Terms per slot key, per source: ``[(adapter index, term), ...]``, on ``device`` in ``dtype``
        (a set loaded before the pipeline moved is moved with it)."""
        grouped: dict[str, list[list[tuple[int, LoraTerm]]]] = {}
        for index, adapter in enumerate(adapters.adapters):
            for path, term in adapter.terms.items():
                where = self.by_path.get(path)
                if where is None:
                    raise ValueError(
                        f"LoRA {adapter.name!r} targets {path!r}, a layer the engine does not apply LoRAs to"
                    )
                slot, source = where
                lists = grouped.setdefault(slot.key, [[] for _ in slot.sources])
                term = LoraTerm(term.down.to(device, dtype), term.up.to(device, dtype), term.scale)
                lists[source].append((index, term))
        return grouped

    @torch.no_grad()
    def apply(
        self,
        adapters: AdapterSet | None,
        strategy: str,
        device: torch.device,
        dtype: torch.dtype,
        padded: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Make ``adapters`` (``None`` or empty: the base model) the running set, with ``strategy``
        (``merge``/``side``), for layers computing in ``dtype`` on ``device``;
        ``padded=(max_loras, max_rank)`` when the blocks are compiled. Returns what happened:
        ``switched``, ``switch_seconds``, ``strategy``, ``layers``."""
        if adapters is not None and not adapters.adapters:
            adapters = None
        key = None if adapters is None else (adapters.key, strategy, padded, device, dtype)
        cacheable = adapters is None or adapters.key is not None
        if cacheable and key == self.applied_key:
            return {"switched": False, "switch_seconds": 0.0, "strategy": self.strategy, "layers": None}
        start = time.perf_counter()
        grouped = {} if adapters is None else self._grouped(adapters, device, dtype)
        if strategy == "merge" and adapters is not None:
            for slot_key in grouped:
                _mergeable(self.slots[slot_key].base, slot_key)
        self.applied_key = self.strategy = None  # whatever fails below, nothing stale is reused
        if strategy == "merge" or adapters is None:
            self._park_side()
        if strategy == "side" or adapters is None:
            self._restore_merged(keep=())
        if adapters is not None:
            if strategy == "merge":
                self._merge(grouped)
            else:
                self._side(grouped, padded, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.applied_key = key if adapters is not None else None
        self.strategy = strategy if adapters is not None else None
        return {
            "switched": True,
            "switch_seconds": time.perf_counter() - start,
            "strategy": self.strategy,
            "layers": len(grouped),
        }

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base model: merged weights restored exactly, side paths removed."""
        self._restore_merged(keep=())
        self._park_side()
        self.parked.clear()
        self.padded_width = None
        self.applied_key = None
        self.strategy = None

    # -- merge ---------------------------------------------------------------------------------------

    def _restore_merged(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for slot_key in list(self.backups):
            slot = self.slots[slot_key]
            for tensor, saved in zip(_weights_of(slot.base), self.backups[slot_key].tensors, strict=True):
                tensor.copy_(saved, non_blocking=True)
            if slot_key not in keep:
                del self.backups[slot_key]

    def _merge(self, grouped: dict[str, list[list[tuple[int, LoraTerm]]]]) -> None:
        # Back to W0 everywhere first: layers of the old set only are done; layers of both are merged
        # again from W0 (never from W0 + old delta, which would drift).
        self._restore_merged(keep=grouped)
        for slot_key, sources in grouped.items():
            slot = self.slots[slot_key]
            base = slot.base
            if slot_key not in self.backups:
                self.backups[slot_key] = _Backup([_host_copy(t) for t in _weights_of(base)])
            for (start, end), terms in zip(slot.rows, sources, strict=True):
                if not terms:
                    continue
                delta = None
                for _, term in terms:
                    product = term.up.to(torch.float32) @ term.down.to(torch.float32)
                    delta = product * term.scale if delta is None else delta.add_(product, alpha=term.scale)
                _merge_rows(base, start, end, delta)

    # -- side path -----------------------------------------------------------------------------------

    def _park_side(self, keep: Iterable[str] = ()) -> None:
        """Take the side paths out of the layers (but those in ``keep``): the plain layer runs again."""
        keep = set(keep)
        for slot in self.slots.values():
            layer = slot.layer
            if isinstance(layer, LoraLinear) and slot.key not in keep:
                setattr(slot.owner, slot.attr, layer.base)
                self.parked[slot.key] = layer

    def _wrapper(self, slot: LoraSlot) -> LoraLinear:
        layer = slot.layer
        if isinstance(layer, LoraLinear):
            return layer
        wrapper = self.parked.pop(slot.key, None)
        if wrapper is None or wrapper.base is not layer:
            wrapper = LoraLinear(layer, slot.rows)
        setattr(slot.owner, slot.attr, wrapper)
        wrapper.active = True
        return wrapper

    def _side(
        self,
        grouped: dict[str, list[list[tuple[int, LoraTerm]]]],
        padded: tuple[int, int] | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        width = None
        if padded is not None:
            max_loras, max_rank = padded
            # Slots hold the adapters side by side; a set larger than the declared limits (diffusers'
            # adapters are not limited) gets wider buffers: correct, at the price of one recompile.
            needed = max(
                (sum(t.rank for _, t in terms) for sources in grouped.values() for terms in sources),
                default=0,
            )
            width = max(max_loras * max_rank, needed)
            if self.padded_width != width:
                self.reset()
                self.padded_width = width
        elif self.padded_width is not None:
            self.reset()
        needed = [key for key, slot in self.slots.items() if key in grouped or (width and slot.in_block)]
        self._park_side(keep=needed)
        for slot_key in needed:
            slot = self.slots[slot_key]
            sources = grouped.get(slot.key)
            compiled_slot = width is not None and slot.in_block
            wrapper = self._wrapper(slot)
            sources = sources or [[] for _ in slot.sources]
            if compiled_slot:
                if not wrapper.padded or wrapper.down.dtype != dtype or wrapper.down.device != device:
                    wrapper.allocate_padded(width, device, dtype)
                self._fill_padded(wrapper, sources)
            else:
                self._fill_exact(wrapper, sources, device, dtype)

    @staticmethod
    def _fill_exact(
        wrapper: LoraLinear,
        sources: list[list[tuple[int, LoraTerm]]],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        downs, ups, widths, scales = [], [], [], []
        for (start, end), terms in zip(wrapper.rows, sources, strict=True):
            widths.append(sum(t.rank for _, t in terms))
            if not terms:
                ups.append(torch.zeros(end - start, 0, device=device, dtype=dtype))
                continue
            for _, term in terms:
                downs.append(term.down)
                scales.append(torch.full((term.rank,), term.scale, device=device, dtype=torch.float32))
            ups.append(torch.cat([t.up for _, t in terms], dim=1))
        wrapper.set_exact(torch.cat(downs), ups, widths, torch.cat(scales))

    @staticmethod
    def _fill_padded(wrapper: LoraLinear, sources: list[list[tuple[int, LoraTerm]]]) -> None:
        """Copy the set into the fixed buffers: each source's terms side by side from the start of its
        block of rank columns, zeros after them, so the shapes never change."""
        wrapper.down.zero_()
        wrapper.scales.zero_()
        for index, (terms, up, width) in enumerate(zip(sources, wrapper.ups(), wrapper.widths, strict=True)):
            up.zero_()
            column = index * width
            offset = 0
            for _, term in terms:
                rank = term.rank
                wrapper.down[column + offset : column + offset + rank].copy_(term.down)
                wrapper.scales[column + offset : column + offset + rank].fill_(term.scale)
                up[:, offset : offset + rank].copy_(term.up)
                offset += rank
