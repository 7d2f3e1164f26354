"""Weights straight into the engine's transformer: BFL's key layout, fp8 single files, meta construction.

- :func:`bfl_to_engine_keys` / :func:`engine_to_bfl`: the mapping between BFL's checkpoint layout
  (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ``final_layer.adaLN_modulation.1``)
  and the engine's :class:`~.model.FillTransformer` state dict. BFL's layout already fuses QKV (and, in
  single-stream blocks, QKV with the MLP input), as the engine does, so the mapping is renames plus the
  final layer's shift/scale halves swapped (BFL: shift, scale; diffusers and the engine: scale, shift).
  It reads widths and depths from the keys, so it works for any width, not only FLUX.1's 3072.
- :func:`read_fp8_checkpoint`: a community single-file fp8 (``float8_e4m3fn``) Fill checkpoint as the
  engine's fp8 state: the block linears' fp8 values kept as they are, their per-tensor scale
  (``<layer>.scale_weight``, ComfyUI's scaled fp8; or ``<layer>.weight_scale``; or none: 1) as the
  engine's per-row scales; the layers the engine keeps in the compute dtype (embedders, final layer,
  norms) dequantized into it. Activation scales (``scale_input``/``input_scale``) are not used: the
  engine quantizes activations per token at run time.
- :func:`meta_engine_transformer` and :func:`materialise`: a FillTransformer built on the meta device
  (nothing allocated), quantized on meta with a given plan, then given the loaded tensors by assignment
  (``load_state_dict(assign=True)``) and the diffusers module tied to them. Weights are never made in
  another dtype on the device than the one they run in.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import FillTransformer
from .quantization import FP8, QuantPlan, quantize_rows

# Prefixes community files put before BFL's keys (ComfyUI's full checkpoints, some re-uploads).
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
# Keys that carry no weight: ComfyUI's scaled-fp8 marker, activation scales (the engine's are dynamic).
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")
_IGNORED_KEYS = ("scaled_fp8",)
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")

_OUTER = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "timestep_embedder.linear_1": "time_in.in_layer",
    "timestep_embedder.linear_2": "time_in.out_layer",
    "guidance_embedder.linear_1": "guidance_in.in_layer",
    "guidance_embedder.linear_2": "guidance_in.out_layer",
    "text_embedder.linear_1": "vector_in.in_layer",
    "text_embedder.linear_2": "vector_in.out_layer",
    "norm_out": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
_DOUBLE_LINEARS = {
    "img_mod": "img_mod.lin",
    "txt_mod": "txt_mod.lin",
    "img_qkv": "img_attn.qkv",
    "txt_qkv": "txt_attn.qkv",
    "img_out": "img_attn.proj",
    "txt_out": "txt_attn.proj",
    "img_mlp_in": "img_mlp.0",
    "img_mlp_out": "img_mlp.2",
    "txt_mlp_in": "txt_mlp.0",
    "txt_mlp_out": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "img_q_norm": "img_attn.norm.query_norm.scale",
    "img_k_norm": "img_attn.norm.key_norm.scale",
    "txt_q_norm": "txt_attn.norm.query_norm.scale",
    "txt_k_norm": "txt_attn.norm.key_norm.scale",
}
_SINGLE_LINEARS = {"mod": "modulation.lin", "qkv_mlp": "linear1", "out": "linear2"}
_SINGLE_NORMS = {"q_norm": "norm.query_norm.scale", "k_norm": "norm.key_norm.scale"}
_SWAPPED = "final_layer.adaLN_modulation.1"  # shift, scale in BFL; scale, shift in the engine


def _block_count(keys: list[str], prefix: str) -> int:
    indices = {int(key.split(".")[1]) for key in keys if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def engine_linear_names(double_blocks: int, single_blocks: int) -> dict[str, str]:
    """Every linear layer of the engine transformer -> its BFL layer name (without ``.weight``)."""
    names = dict(_OUTER)
    for index in range(double_blocks):
        for mine, theirs in _DOUBLE_LINEARS.items():
            names[f"double_blocks.{index}.{mine}"] = f"double_blocks.{index}.{theirs}"
    for index in range(single_blocks):
        for mine, theirs in _SINGLE_LINEARS.items():
            names[f"single_blocks.{index}.{mine}"] = f"single_blocks.{index}.{theirs}"
    return names


def engine_norm_names(double_blocks: int, single_blocks: int) -> dict[str, str]:
    """Every q/k RMSNorm weight of the engine transformer -> its BFL key."""
    names = {}
    for index in range(double_blocks):
        for mine, theirs in _DOUBLE_NORMS.items():
            names[f"double_blocks.{index}.{mine}"] = f"double_blocks.{index}.{theirs}"
    for index in range(single_blocks):
        for mine, theirs in _SINGLE_NORMS.items():
            names[f"single_blocks.{index}.{mine}"] = f"single_blocks.{index}.{theirs}"
    return names


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """The two halves of the rows exchanged (BFL's shift, scale <-> the engine's scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def engine_to_bfl(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unquantized engine transformer's state dict in BFL's checkpoint layout (for tests and exports)."""
    keys = list(state)
    linears = engine_linear_names(_block_count(keys, "double_blocks."), _block_count(keys, "single_blocks."))
    norms = engine_norm_names(_block_count(keys, "double_blocks."), _block_count(keys, "single_blocks."))
    out = {}
    for key, tensor in state.items():
        if key in norms:
            out[norms[key]] = tensor
            continue
        layer, _, leaf = key.rpartition(".")
        if layer not in linears or leaf not in ("weight", "bias"):
            raise ValueError(f"{key!r} is not a layer of an unquantized engine transformer")
        name = linears[layer]
        out[f"{name}.{leaf}"] = swap_halves(tensor) if name == _SWAPPED else tensor
    return out


def strip_prefix(keys: list[str]) -> str:
    """The prefix every BFL key in ``keys`` carries (``""`` for none)."""
    for prefix in BFL_PREFIXES:
        if any(key.startswith(prefix + "double_blocks.") for key in keys):
            return prefix
    return ""


def read_header(path: str | Path) -> dict[str, Any]:
    """A safetensors file's header (names -> dtype, shape, offsets): read without loading any tensor."""
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 2**20:
            raise ValueError(f"{str(path)!r} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{str(path)!r} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return header


def is_fp8_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file whose BFL-layout block weights are stored in fp8."""
    if not str(path).endswith((".safetensors", ".sft")) or not Path(path).is_file():
        return False
    try:
        header = read_header(path)
    except (OSError, ValueError):
        return False
    return any(
        "blocks." in key and key.endswith(".weight") and info.get("dtype", "").startswith("F8_")
        for key, info in header.items()
    )


def _scale_rows(scale: torch.Tensor | None, rows: int, name: str) -> torch.Tensor:
    """A file's weight scale (one per tensor, or one per row) as the engine's ``[rows, 1]`` fp32 scales."""
    if scale is None:
        return torch.ones(rows, 1, dtype=torch.float32)
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, 1).contiguous()
    if scale.numel() == rows:
        return scale.reshape(rows, 1)
    raise ValueError(f"{name}: a weight scale of shape {tuple(scale.shape)} for {rows} rows")


def read_fp8_checkpoint(
    path: str | Path,
    expected: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The engine state dict of a BFL-layout fp8 single file, shaped as ``expected`` (a FillTransformer
    quantized to fp8 on meta): block linears as ``weight_bits``/``scale_bits`` of fp8 values and per-row
    scales, read onto ``device`` as stored; the other layers in ``dtype``.

    A block linear stored in another dtype than fp8 (some files keep a few) is quantized per row on
    the device, one layer at a time. ``float8_e5m2`` weights are refused (the engine runs e4m3).
    """
    from safetensors import safe_open

    header = read_header(path)
    keys = list(header)
    prefix = strip_prefix(keys)
    doubles = _block_count([k[len(prefix) :] for k in keys if k.startswith(prefix)], "double_blocks.")
    singles = _block_count([k[len(prefix) :] for k in keys if k.startswith(prefix)], "single_blocks.")
    linears = engine_linear_names(doubles, singles)
    norms = engine_norm_names(doubles, singles)
    e5m2 = [key for key, info in header.items() if info.get("dtype") == "F8_E5M2"]
    if e5m2:
        raise ValueError(
            f"{str(path)!r} stores float8_e5m2 weights ({e5m2[0]}, ...); the engine's fp8 path reads "
            "float8_e4m3fn checkpoints"
        )
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as file:
        names = set(file.keys())

        def get(name: str) -> torch.Tensor | None:
            key = prefix + name
            if key not in names:
                return None
            used.add(key)
            return file.get_tensor(key)

        def need(name: str, where: str) -> torch.Tensor:
            tensor = get(name)
            if tensor is None:
                raise ValueError(f"{str(path)!r} has no {prefix + name!r} (the engine's {where})")
            return tensor

        for mine, theirs in linears.items():
            weight = need(f"{theirs}.weight", mine)
            scale = next(
                (s for s in (get(theirs + suffix) for suffix in _SCALE_SUFFIXES) if s is not None), None
            )
            bias = get(f"{theirs}.bias")
            if theirs == _SWAPPED:
                weight = swap_halves(weight)
                bias = None if bias is None else swap_halves(bias)
            if bias is not None:
                state[f"{mine}.bias"] = bias.to(dtype)
            if f"{mine}.weight_bits" in expected:
                if weight.dtype == FP8:
                    values, scales = weight, _scale_rows(scale, weight.shape[0], prefix + theirs).to(device)
                else:  # kept unquantized in the file: quantize this one layer per row
                    values, scales = quantize_rows(_dequantized(weight, scale), "fp8")
                state[f"{mine}.weight_bits"] = values.contiguous().view(torch.uint8)
                state[f"{mine}.scale_bits"] = scales.contiguous().view(torch.int32)
            else:
                state[f"{mine}.weight"] = _dequantized(weight, scale).to(dtype)
        for mine, theirs in norms.items():
            state[mine] = need(theirs, mine).to(dtype)
    left = sorted(
        key
        for key in names - used
        if not key.endswith(_SCALE_SUFFIXES + _IGNORED_SUFFIXES) and key not in _IGNORED_KEYS
    )
    if left:
        raise ValueError(
            f"{str(path)!r} has {len(left)} keys the FLUX Fill transformer does not use ({left[:3]}, ...): "
            "not a BFL-layout FLUX.1 Fill checkpoint"
        )
    return state


def _dequantized(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if weight.dtype != FP8:
        return weight if scale is None else weight.float() * scale.float().reshape(-1, 1)
    rows = _scale_rows(scale, weight.shape[0], "weight").to(weight.device)
    return weight.float() * rows


def meta_engine_transformer(
    config: Mapping[str, Any], plan: QuantPlan | None
) -> tuple[nn.Module, FillTransformer]:
    """A diffusers ``FluxTransformer2DModel`` of ``config`` and its engine transformer, built on the meta
    device (no memory), quantized with ``plan`` on meta: the shapes and dtypes a loaded state must have."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(dict(config))
    if not isinstance(transformer, FluxTransformer2DModel):
        raise TypeError(f"the transformer config built a {type(transformer).__name__}")
    transformer.eval().requires_grad_(False)
    fill = FillTransformer.from_diffusers(transformer)  # attention "sdpa": the runtime sets the real one
    if plan is not None:
        fill.quantize(plan)
    return transformer, fill


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state that does not fit the engine transformer: the keys missing, unexpected, or of
    another shape or dtype, named (the first few of each)."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensors ({', '.join(missing[:3])}, ...)")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:3])}, ...)")
    for key in sorted(set(state) & set(expected)):
        have, want = state[key], expected[key]
        if have.shape != want.shape or (
            want.dtype in (torch.uint8, torch.int32) and have.dtype != want.dtype
        ):
            problems.append(
                f"{key}: {tuple(have.shape)} {have.dtype}, expected {tuple(want.shape)} {want.dtype}"
            )
            if len(problems) > 5:
                break
    if problems:
        raise ValueError(f"{source} does not fit the model's config: " + "; ".join(problems))


def materialise(transformer: nn.Module, fill: FillTransformer, state: Mapping[str, torch.Tensor]) -> None:
    """Give a meta-built engine transformer the tensors of ``state`` (assigned, not copied) and tie the
    diffusers module to them: shared tensors are put in its slots, fused layers' sources become views.
    The state must have passed :func:`check_state`."""
    holders: dict[int, list[tuple[dict[str, Any], str]]] = {}
    for module in transformer.modules():
        for slots in (module._parameters, module._buffers):
            for name, tensor in slots.items():
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((slots, name))
    owners = {}
    for key in state:
        path, _, leaf = key.rpartition(".")
        module = fill.get_submodule(path)
        owners[key] = (module, leaf, id(getattr(module, leaf)))
    fill.load_state_dict(dict(state), strict=True, assign=True)
    for module, leaf, old in owners.values():
        new = getattr(module, leaf)
        for slots, name in holders.get(old, []):
            slots[name] = new
    for block in fill.blocks():
        for name, sources in block.linear_sources.items():
            fused = getattr(block, name)
            if len(sources) == 1 or not isinstance(fused, nn.Linear):
                continue  # a shared module, or slices of a quantized one: tied by identity
            start = 0
            for parent, attr in sources:
                linear = getattr(parent, attr)
                end = start + linear.out_features
                linear.weight = nn.Parameter(fused.weight[start:end], requires_grad=False)
                if fused.bias is not None:
                    linear.bias = nn.Parameter(fused.bias[start:end], requires_grad=False)
                start = end
    left = [name for name, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors of the transformer were not loaded: {left[:5]}")
    # The engine checks that both trees still hold the parameter objects it was built with; they are new.
    fill._source_params = FillTransformer._parameter_ids(transformer)
