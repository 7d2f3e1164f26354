"""The GPU run's summary table, printed last (the device tool returns the output's tail); every
number in it is in the JSON."""

from __future__ import annotations

from typing import Any

from .budget import PARTS


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
            built = f"built in {_num(native.get('build_s'), '.0f')} s, " if "build_s" in native else ""
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
    return "\n".join(lines)
