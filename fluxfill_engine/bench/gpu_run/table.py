"""The GPU run's summary, printed last (the device tool returns the output's tail): each part's
details, then the headline table (ms per step and end-to-end seconds of diffusers' rows and the
engine's presets, their ratios, fractions of the measured ceilings and drift). Every number in it is in
the JSON."""

from __future__ import annotations

from typing import Any

from .budget import PARTS
from .profiles import HEADLINE_ROWS


def _num(value: Any, fmt: str = ".3g") -> str:
    """A number for the table; ``-`` for what was not measured."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def _why(item: dict[str, Any], width: int = 60) -> str:
    """An item's status with its reason or error, for a row that has no numbers."""
    text = item.get("reason") or (item.get("error") or {}).get("message") or ""
    return f"{item.get('status', '-')}: {text}"[:width]


def render_table(record: dict[str, Any]) -> str:
    """A short plain-text summary of the record, printed last (the device tool returns the output's
    tail); every number in it is in the JSON."""
    parts = record.get("parts", {})

    def items(part: str) -> dict[str, Any]:
        return parts.get(part, {}).get("items", {})

    lines = [
        f"fluxfill gpu_run ({record.get('mode')}): {_num(record.get('elapsed_s'), '.0f')} s, "
        f"complete: {_num(record.get('complete'))}",
        f"{'part':<13}{'status':<12}{'s':>6}  note",
    ]
    for name in PARTS:
        part = parts.get(name, {})
        note = (
            part.get("reason")
            or (part.get("error") or {}).get("message")
            or (part.get("worker") or {}).get("note")
            or ", ".join(part.get("failed_items", []))
        )
        lines.append(
            f"{name:<13}{part.get('status', '-'):<12}{_num(part.get('seconds'), '.0f'):>6}  {note[:72]}"
        )

    machine = items("machine")
    info, matmul, copy = machine.get("info", {}), machine.get("matmul", {}), machine.get("copy", {})
    if info:
        lines.append(
            f"machine: {info.get('device_name')}, driver {_num(info.get('driver'))}, torch {info.get('torch')}, "
            f"CUDA {_num(info.get('torch_cuda'))}, triton {_num(info.get('triton'))}"
        )
    if matmul or copy:
        peaks = ", ".join(
            f"{key} {_num(value['tflops'], '.1f')}"
            for key, value in matmul.items()
            if isinstance(value, dict) and "tflops" in value
        )
        lines.append(f"  matmul TFLOP/s: {peaks or '-'}; copy {_num(copy.get('tb_per_s'), '.2f')} TB/s")

    checks = items("correctness")
    if checks:
        lines.append(f"{'check':<36}{'ok':<5}{'max abs err':>12}{'rel L2':>10}{'SQNR dB':>9}")
        for key, item in checks.items():
            if key in ("native", "kernel_tests"):
                continue
            if item.get("status") != "ok":
                lines.append(f"{key:<36}{_why(item, 70)}")
                continue
            ok = item.get("within_tolerance", item.get("within_bound"))
            lines.append(
                f"{key:<36}{_num(ok):<5}{_num(item.get('max_abs_error'), '.2e'):>12}"
                f"{_num(item.get('rel_l2_error'), '.1e'):>10}{_num(item.get('sqnr_db'), '.1f'):>9}"
            )
        native = checks.get("native", {})
        if native:
            built = (
                f"built in {_num(native.get('build_s'), '.0f')} s ({native.get('generator', '-')}), "
                if "build_s" in native
                else ""
            )
            lines.append(
                f"native library: {built}{_why(native, 60) if native.get('status') != 'ok' else 'checks within tolerance: ' + _num(native.get('within_tolerance'))}"
            )
        tests = checks.get("kernel_tests", {})
        if tests:
            summary = tests.get("counts") if tests.get("status") == "ok" else _why(tests, 70)
            lines.append(f"kernel tests on the device: {summary}")

    steps = items("latency")
    if steps:
        lines.append(
            f"{'step (1 transformer forward)':<38}{'ms':>8}{'TFLOP/s':>9}{'%peak':>7}{'SQNR':>7}{'GiB':>6}{'cold s':>8}"
        )
        for key, item in steps.items():
            if item.get("status") != "ok":
                lines.append(f"{key:<38}{_why(item, 44)}")
                continue
            fraction = item.get("fraction_of_measured_peak")
            drift = (
                "ref"
                if key == "reference"
                else "exact"
                if item.get("exact_vs_reference")
                else _num(item.get("sqnr_vs_reference_db"), ".1f")
            )
            lines.append(
                f"{key:<38}{_num(item.get('ms_per_step'), '.1f'):>8}{_num(item.get('tflops'), '.1f'):>9}"
                f"{_num(None if fraction is None else 100 * fraction, '.0f'):>7}{drift:>7}"
                f"{_num(item.get('peak_during_steps_gib'), '.1f'):>6}{_num(item.get('cold_call_s'), '.1f'):>8}"
            )
        dropped = {
            name: why
            for item in steps.values()
            for name, why in item.get("auto_attention_dropped", {}).items()
        }
        if dropped:
            lines.append(
                "auto attention dropped: "
                + "; ".join(f"{name} ({why[:80]})" for name, why in dropped.items())
            )
        batched = [item for item in steps.values() if item.get("status") == "ok" and "batch_size" in item]
        if batched:
            lines.append(
                "batching, ms per image-step: "
                + ", ".join(
                    f"batch {item['batch_size']} {_num(item['ms_per_image_step'], '.1f')} "
                    f"({_num(item.get('speedup_per_image_vs_batch_1'), '.2f')}x)"
                    for item in batched
                )
            )

    e2e = items("e2e")
    if e2e:
        lines.append(
            f"{'call (s)':<12}{'text':>7}{'prep+VAE':>9}{'denoise':>9}{'decode':>8}{'total':>8}{'ms/step':>9}"
        )
        for key, item in e2e.items():
            if item.get("status") != "ok":
                lines.append(f"{key:<12}{_why(item, 60)}")
                continue
            lines.append(
                f"{key:<12}{_num(item.get('text_encode_s'), '.2f'):>7}{_num(item.get('prepare_and_vae_encode_s'), '.2f'):>9}"
                f"{_num(item.get('denoise_s'), '.2f'):>9}{_num(item.get('decode_s'), '.2f'):>8}"
                f"{_num(item.get('total_s'), '.2f'):>8}{_num(item.get('transformer_ms_per_call'), '.1f'):>9}"
            )

    cache = items("step_cache").get("skip_vs_full", {})
    if cache.get("status") == "ok":
        lines.append(
            f"step cache: full step {_num(cache.get('full_step_ms'), '.1f')} ms, skipped step "
            f"{_num(cache.get('skipped_step_ms'), '.2f')} ms ({_num(100 * cache['skipped_over_full'], '.1f')}% of a full step)"
        )
    elif cache:
        lines.append(f"step cache: {_why(cache, 90)}")
    lines += headline_table(record)
    return "\n".join(lines)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    """``numerator / denominator`` as a speed-up (``2.10x``), ``-`` when either is missing."""
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def headline_table(record: dict[str, Any]) -> list[str]:
    """The table a reader takes in at a glance: per headline row, ms per transformer step, the speed-up
    against diffusers eager and against diffusers' fastest row, the fraction of the measured ceiling
    (bf16, or fp8 row-wise with fast accumulation), drift against the engine reference (SQNR dB), and
    the end-to-end seconds where the e2e part ran that row."""
    parts = record.get("parts", {})
    steps = parts.get("latency", {}).get("items", {})
    e2e = parts.get("e2e", {}).get("items", {})
    model = parts.get("latency", {}).get("model", {})
    size = f"{model['width']}x{model['height']}" if "width" in model else "the profile's size"

    def ms(name: str) -> float | None:
        item = steps.get(name, {})
        return item.get("ms_per_step") if item.get("status") == "ok" else None

    eager = ms("diffusers")
    diffusers_ms = [
        m for m in (ms(n) for n in ("diffusers", "diffusers-compile", "diffusers-fp8-compile")) if m
    ]
    best = min(diffusers_ms) if diffusers_ms else None
    end_to_end = {"diffusers eager": e2e.get("diffusers", {}), "engine fast": e2e.get("fast", {})}
    lines = [
        f"headline at {size} ({record.get('mode')}): ms per transformer step; speed-up = diffusers' ms / row's ms",
        f"{'row':<34}{'ms/step':>9}{'vs eager':>9}{'vs best':>9}{'%ceil':>7} {'ceiling':<23}{'SQNR dB':>8}{'e2e s':>8}",
    ]
    for label, name in HEADLINE_ROWS:
        item = steps.get(name)
        call = end_to_end.get(label, {})
        total = _num(call.get("total_s"), ".2f") if call.get("status") == "ok" else "-"
        if item is None:
            lines.append(f"{label:<34}{'not run':>9}{'':>50}{total:>8}")
            continue
        if item.get("status") != "ok":
            lines.append(f"{label:<34}{_why(item, 62)}")
            continue
        fraction = item.get("fraction_of_measured_peak")
        drift = (
            "ref"
            if name == "reference"
            else "exact"
            if item.get("exact_vs_reference")
            else _num(item.get("sqnr_vs_reference_db"), ".1f")
        )
        lines.append(
            f"{label:<34}{_num(item['ms_per_step'], '.1f'):>9}{_ratio(eager, item['ms_per_step']):>9}"
            f"{_ratio(best, item['ms_per_step']):>9}{_num(None if fraction is None else 100 * fraction, '.0f'):>7} "
            f"{_num(item.get('ceiling')):<23}{drift:>8}{total:>8}"
        )
    fast, slow = end_to_end["engine fast"], end_to_end["diffusers eager"]
    if fast.get("status") == "ok" and slow.get("status") == "ok":
        lines.append(
            f"end to end ({_num(fast.get('steps'))} steps): engine fast {_num(fast['total_s'], '.2f')} s, "
            f"diffusers eager {_num(slow['total_s'], '.2f')} s: {_ratio(slow['total_s'], fast['total_s'])}"
        )
    accumulation = {
        label: steps.get(name, {}).get("fp8_fast_accumulation")
        for label, name in (("engine fp8", "fast:compile_dynamic=0"), ("torchao", "diffusers-fp8-compile"))
    }
    said = [
        f"{label} {'fast' if fast_accum else 'full'}"
        for label, fast_accum in accumulation.items()
        if fast_accum is not None
    ]
    if said:
        lines.append(f"fp8 accumulation: {', '.join(said)}")
    return lines
