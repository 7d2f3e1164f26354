"""The benchmark record as JSON, a markdown table and a speed-vs-drift plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..call import STAGES
from .summary import REFERENCE


def write_json(record: dict[str, Any], path: str | Path) -> Path:
    """Write ``record`` as strict JSON (no NaN/Infinity), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    temporary.replace(path)
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if magnitude < 0.01 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def _drift(variant: dict[str, Any]) -> tuple[str, str]:
    drift = variant.get("drift")
    if not drift:
        return "–", "–"
    if variant["name"] == REFERENCE or drift.get("exact"):
        return "exact", "exact" if drift.get("image_psnr_db") is None else _fmt(drift["image_psnr_db"])
    image = drift.get("image_psnr_db")
    return _fmt(drift.get("latent_sqnr_db")), "exact" if image is None else _fmt(image)


def _stats_brief(stats: dict[str, Any]) -> str:
    """The scalar entries of a variant's stats (per-step lists left to the JSON)."""
    flat: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if not isinstance(v, (dict, list)) and k not in flat})
        elif not isinstance(value, list):
            flat[key] = value
    return ", ".join(f"{k}={v}" for k, v in flat.items())


def render_markdown(record: dict[str, Any]) -> str:
    """The record as a markdown report: setup, one row per variant, a per-stage table, notes."""
    env, settings, model = record["environment"], record["settings"], record["model"]
    flops = model["flops_per_step"]["total"]
    peak = record["peak"]
    sha = (env.get("git_sha") or "unknown")[:10] + (" (uncommitted changes)" if env.get("git_dirty") else "")
    lines = [
        f"# fluxfill bench: {model['preset']}",
        "",
        f"- Device: **{env['device_name']}** ({env['device']}), torch {env['torch']}, "
        f"diffusers {env['diffusers']}, triton {env.get('triton') or '–'}, "
        f"transformers {env.get('transformers') or '–'}; fluxfill-engine {env['fluxfill_engine']} "
        f"at git {sha}; {env['date']}.",
        f"- Model: {model['description']}; {model['transformer_parameters'] / 1e6:.1f}M transformer "
        f"parameters, {settings['dtype']}.",
        f"- Request: {settings['width']}x{settings['height']} ({model['image_tokens']} image + "
        f"{model['text_tokens']} text tokens), {settings['steps']} steps, guidance "
        f"{settings['guidance_scale']:g}, seed {settings['seed']}. {settings['repeats']} timed calls per "
        f"variant after {settings['warmup']} warm-up call(s); {settings['order']}.",
        f"- Work per step: {_fmt(flops / 1e9)} GFLOP (transformer, counted from the shapes). Peak used for "
        f"the fraction: {peak['source']}"
        + (
            f"; measured matmul ceiling: {', '.join(f'{k} {v:.0f}' for k, v in peak['measured_tflops'].items())} "
            f"TFLOP/s ({peak['measured_method']})."
            if peak.get("measured_tflops")
            else "."
        ),
    ]
    if env.get("load_average_at_start") is not None:
        trace = record.get("load_average_after_repeats") or []
        after = f"; 1-minute load after each repeat: {[x[0] for x in trace]}" if trace else ""
        lines.append(
            f"- Load average at start: {env['load_average_at_start']} on {env['cpu_count']} CPUs{after} "
            f"(this run adds up to its {env['torch_threads']} torch threads; more means other work "
            "shared the machine)."
        )
    if settings.get("note"):
        lines.append(f"- Note: {settings['note']}")
    if not record.get("complete", False):
        lines.append("- **Partial record**: the run did not finish.")
    lines += [
        "",
        "| variant | e2e s, median [p20, p80] | vs diffusers (e2e / transformer) | transformer ms/step "
        "| TFLOP/s (of peak) | memory: weights + run peak | cold / warm s | latent SQNR dB | image PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in record["variants"]:
        if "e2e_s" not in v:
            lines.append(f"| {v['name']} | (no timed calls yet) |  |  |  |  |  |  |  |")
            continue
        e2e, step = v["e2e_s"], v["transformer_ms_per_step"]
        ratio = v["speedup_vs_diffusers"]
        ratios = f"{_fmt(ratio['e2e'])}x / {_fmt(ratio['transformer'])}x" if ratio["e2e"] else "–"
        fractions = [
            f"{100 * v[key]:.1f}% {what}"
            for key, what in (("peak_fraction", "datasheet"), ("measured_peak_fraction", "measured"))
            if v.get(key)
        ]
        fraction = f" ({', '.join(fractions)})" if fractions else ""
        mem = v["memory"]
        warm = v["warmup"]
        sqnr, psnr = _drift(v)
        lines.append(
            f"| {v['name']} | {_fmt(e2e['median'])} [{_fmt(e2e['p20'])}, {_fmt(e2e['p80'])}] | {ratios} "
            f"| {_fmt(step['median'])} | {_fmt(v['tflops'])}{fraction} "
            f"| {_bytes(mem['weights_bytes'])} + {_bytes(mem['run_peak_extra_bytes'])} "
            f"| {_fmt(warm['cold_s'])} / {_fmt(warm['warm_s'])} | {sqnr} | {psnr} |"
        )
    lines += ["", "Per-stage medians (seconds):", ""]
    lines.append("| variant | " + " | ".join(STAGES) + " |")
    lines.append("|---|" + "---|" * len(STAGES))
    for v in record["variants"]:
        if "stages_s" in v:
            cells = " | ".join(_fmt(v["stages_s"][s]["median"]) for s in STAGES)
            lines.append(f"| {v['name']} | {cells} |")
    notes = [
        "e2e: the whole pipeline call (prompt encoding, VAE encode, sampling, decode, postprocess), "
        "device-synchronised. The engine clears its prompt cache before every call unless "
        "--keep-prompt-cache.",
        "transformer ms/step: engine: the denoise stage over its steps (with the Euler update); "
        "diffusers: the mean transformer forward. TFLOP/s = work per step / that time; for variants "
        "that skip blocks (step caches) it is an effective rate.",
        "memory: bytes of the variant's weights (shared storage counted once) + the peak above the "
        f"start of a call ({'CUDA allocator' if env['device'].startswith('cuda') else 'resident set size'}).",
        "cold: the variant's first call (compilation, autotuning, lazy init); warm: its second.",
        "drift: against the `reference` variant on the same inputs: SQNR of the final latents "
        "(20 log10 |ref| / |ref - out|), PSNR of the output images in [0, 1].",
    ]
    stats_lines = [
        f"`{v['name']}`: {_stats_brief(v['stats'])}"
        for v in record["variants"]
        if v.get("stats") and (v["stats"].get("step_cache") or "fbcache_threshold" in v["stats"])
    ]
    if stats_lines:
        notes.append("step caches (last call): " + "; ".join(stats_lines))
    resolved = [
        f"`{v['name']}`: {v['transformer_dtype']}"
        + (
            f", {q['mode']} via {q['backend']} ({q['why']})"
            if (q := (v.get("engine") or {}).get("quantization")) and q["mode"] != "none"
            else ""
        )
        for v in record["variants"]
        if v["kind"] == "engine"
    ]
    if resolved:
        notes.append("engine variants as resolved on this device: " + "; ".join(resolved))
    if record.get("variants_skipped"):
        skipped = "; ".join(f"`{k}`: {r}" for k, r in record["variants_skipped"].items())
        notes.append(f"cannot run on this machine: {skipped}")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot_speed_vs_drift(record: dict[str, Any], path: str | Path) -> bool:
    """Scatter speed-up over diffusers against latent SQNR, one marker per variant (legend beside).

    SQNR above 100 dB (float rounding) is drawn at 100; bit-identical results at 110 ("exact").
    Returns ``False`` (and writes nothing) when matplotlib is not installed.
    """
    # matplotlib is the optional `bench` extra, absent where the package is type-checked; without it
    # there is no plot (the ImportError below).
    try:
        import matplotlib  # pyright: ignore[reportMissingImports]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError:
        return False
    rounding, exact = 100.0, 110.0
    figure, axes = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for i, v in enumerate(record["variants"]):
        ratio = (v.get("speedup_vs_diffusers") or {}).get("e2e")
        drift = v.get("drift") or {}
        if ratio is None or not drift:
            continue
        sqnr = drift.get("latent_sqnr_db")
        x = exact if drift.get("exact") or sqnr is None else min(sqnr, rounding)
        label = f"{v['name']} ({ratio:.2f}x, {'exact' if x == exact else f'{sqnr:.0f} dB'})"
        axes.scatter(
            [x], [ratio], s=55, marker=markers[i % len(markers)], color=colours[i % len(colours)], label=label
        )
    axes.axhline(1.0, color="0.7", linewidth=1)
    for x, text in ((rounding, ">= 100 dB"), (exact, "exact")):
        axes.axvline(x, color="0.85", linestyle=":", linewidth=1)
        axes.text(x, 1.0, f" {text}", fontsize=7, color="0.5", rotation=90, va="bottom")
    axes.set_xlabel("latent SQNR vs reference (dB, higher = less drift)")
    axes.set_ylabel("speed-up over diffusers (end to end)")
    env, model = record["environment"], record["model"]
    settings = record["settings"]
    axes.set_title(
        f"fluxfill bench {model['preset']} on {env['device_name']}: {settings['width']}x{settings['height']}, "
        f"{settings['steps']} steps",
        fontsize=9,
    )
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
