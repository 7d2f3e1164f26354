"""``fluxfill bench serve-load``: an open-loop load test of ``fluxfill serve``. Requests are sent at a
fixed rate whatever the server does (so a slow server builds a queue and answers 429, as real traffic
would make it), each accepted task followed over its event stream to its closing event.

Reports p50 / p99 latency (submission to closing event), throughput (completed tasks per second of
the run), the 429 rate, and checks that every accepted task ended exactly once (one closing event,
and a final status that agrees with it)::

    fluxfill bench serve-load --requests 200 --rate 20 --out benchmarks/results/serve-load-cpu
    fluxfill bench serve-load --url http://gpu-box:8000 --api-key K --size 1024 --steps 28
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .catalog import BenchError

CLOSING = ("task_postprocess_end", "task_error", "task_cancel")


@dataclass
class Outcome:
    """One request of the run."""

    index: int
    sent_at: float
    http_status: int = 0
    task_id: str | None = None
    closing_events: list[str] = field(default_factory=list)
    final_status: str | None = None
    latency: float | None = None
    batch_size: int | None = None
    error: str | None = None


def _png_data_url(width: int, height: int, mask: bool, seed: int, flat: bool = False) -> str:
    """A PNG as a data URL: noise (``flat``: one colour, a few KiB however large), or a mask with a
    white box in the middle."""
    import numpy as np
    import PIL.Image

    if flat and not mask:
        array = np.full((height, width, 3), (40 + seed % 200, 120, 200), np.uint8)
    elif mask:
        array = np.zeros((height, width), np.uint8)
        array[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    else:
        rng = np.random.default_rng(seed)
        array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _one(client: Any, outcome: Outcome, payload: dict[str, Any], headers: dict[str, str]) -> None:
    start = time.perf_counter()
    try:
        answer = await client.post("/v1/tasks", json=payload, headers=headers)
        outcome.http_status = answer.status_code
        if answer.status_code != 201:
            return
        outcome.task_id = answer.json()["id"]
        name = None
        async with client.stream("GET", f"/v1/tasks/{outcome.task_id}/events", headers=headers) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                    if name in CLOSING:
                        outcome.closing_events.append(name)
                        outcome.latency = time.perf_counter() - start
                elif line.startswith("data: ") and name == "task_accept":
                    outcome.batch_size = json.loads(line[6:]).get("batch_size")
        # The stream closes after the closing event; a second closing event would have shown above
        # only if the server wrote one before closing, so the replay is read once more to be sure.
        replay = await client.get(f"/v1/tasks/{outcome.task_id}/events", headers=headers)
        outcome.closing_events = [
            line[7:]
            for line in replay.text.splitlines()
            if line.startswith("event: ") and line[7:] in CLOSING
        ]
        outcome.final_status = (await client.get(f"/v1/tasks/{outcome.task_id}", headers=headers)).json()[
            "status"
        ]
    except Exception as err:  # a load test reports failures, it does not stop at the first
        outcome.error = f"{type(err).__name__}: {err}"


async def run_load(
    url: str,
    requests: int,
    rate: float,
    size: int = 256,
    steps: int = 2,
    max_megapixels: float = 0.065,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> list[Outcome]:
    """Send ``requests`` requests at ``rate`` per second to ``url``; returns what happened to each."""
    import httpx

    image, mask = _png_data_url(size, size, False, 0), _png_data_url(size, size, True, 0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        jobs = []
        outcomes = []
        for index in range(requests):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = Outcome(index=index, sent_at=time.perf_counter() - start)
            payload = {
                "prompt": f"load test {index}",
                "image": image,
                "mask": mask,
                "seed": index,
                "num_inference_steps": steps,
                "max_megapixels": max_megapixels,
            }
            outcomes.append(outcome)
            jobs.append(asyncio.create_task(_one(client, outcome, payload, headers)))
        await asyncio.gather(*jobs)
    return outcomes


def summarize(outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    """Latency percentiles, throughput, 429 rate, and the exactly-once check."""
    accepted = [o for o in outcomes if o.http_status == 201]
    completed = [o for o in accepted if o.final_status == "completed"]
    latencies = sorted(o.latency for o in completed if o.latency is not None)

    def percentile(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))]

    closing_to_status = {
        "task_postprocess_end": "completed",
        "task_error": "failed",
        "task_cancel": "canceled",
    }
    not_once = [
        o.index
        for o in accepted
        if len(o.closing_events) != 1 or closing_to_status.get(o.closing_events[0]) != o.final_status
    ]
    batches = [o.batch_size for o in completed if o.batch_size]
    return {
        "requests": len(outcomes),
        "accepted": len(accepted),
        "rejected_429": sum(o.http_status == 429 for o in outcomes),
        "rate_429": sum(o.http_status == 429 for o in outcomes) / max(len(outcomes), 1),
        "other_status": sorted({o.http_status for o in outcomes} - {201, 429}),
        "completed": len(completed),
        "failed": sum(o.final_status == "failed" for o in accepted),
        "client_errors": [o.error for o in outcomes if o.error][:5],
        "latency_p50_s": percentile(0.5),
        "latency_p99_s": percentile(0.99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
        "throughput_tasks_per_s": len(completed) / wall if wall > 0 else None,
        "mean_batch_size": statistics.fmean(batches) if batches else None,
        "wall_seconds": wall,
        "every_accepted_task_ended_once": not not_once,
        "not_ended_once": not_once,
    }


# ---- hostile and careless clients (issue 23): bodies refused unread, a queue of large inputs, SIGTERM --


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``; ``VmHWM``: its peak), from ``/proc/PID/status`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} in /proc/{pid}/status")


class MemoryPeak:
    """The peak of a process's ``VmRSS`` sampled every ``every`` seconds while the block runs (``VmHWM``
    would include the server's start)."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every = pid, every
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> MemoryPeak:
        self.before = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = rss_bytes(self.pid)
        self.peak = max(self.peak, self.after)


@dataclass
class UnreadUpload:
    """One upload sent as fast as the server takes it, answered before its end (or not)."""

    status: int | None  # None: no answer within the time allowed
    seconds: float  # from the first byte sent to the answer
    sent_bytes: int  # what the client got into the connection before the answer (kernel buffers too)
    declared_bytes: int


def unread_upload(
    url: str, path: str, declared_bytes: int, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> UnreadUpload:
    """POST a body declared as ``declared_bytes`` to ``url + path`` over a plain socket, sending it while
    the server reads and stopping at its answer: how much of it a refusal let through, and how fast."""
    import select
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {declared_bytes}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    chunk = b"x" * 2**16
    start = time.perf_counter()
    sent, answer = 0, b""
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        while time.perf_counter() - start < timeout:
            writable = [sock] if sent < declared_bytes else []
            readable, can_write, _ = select.select([sock], writable, [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                answer += data
                if not data or b"\r\n\r\n" in answer:
                    break
            elif can_write:
                try:
                    sent += sock.send(chunk[: declared_bytes - sent])
                except BlockingIOError:
                    pass
                except OSError:  # the server closed the connection after its answer
                    sock.setblocking(True)
                    sock.settimeout(1.0)
                    with contextlib.suppress(OSError):
                        answer += sock.recv(65536)
                    break
    seconds = time.perf_counter() - start
    status_line = answer.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else None
    return UnreadUpload(status, seconds, sent, declared_bytes)


def refused_unread_uploads(
    url: str, pid: int | None, uploads: int = 20, declared_mb: float = 60.0, timeout: float = 30.0
) -> dict[str, Any]:
    """``uploads`` unauthenticated uploads of ``declared_mb`` MiB at once against a server with an API
    key: their answers, times, the bytes they got through, and the server's memory (``pid``)."""
    from concurrent.futures import ThreadPoolExecutor

    declared = int(declared_mb * 2**20)
    with contextlib.ExitStack() as stack:
        memory = stack.enter_context(MemoryPeak(pid)) if pid is not None else None
        with ThreadPoolExecutor(uploads) as pool:
            results = list(
                pool.map(lambda _: unread_upload(url, "/v1/tasks", declared, timeout=timeout), range(uploads))
            )
    times = sorted(r.seconds for r in results)
    return {
        "uploads": uploads,
        "declared_mib_each": declared_mb,
        "answers": sorted({str(r.status) for r in results}),
        "answered_401": sum(r.status == 401 for r in results),
        "answer_p50_s": times[len(times) // 2],
        "answer_max_s": times[-1],
        "client_sent_mib_max": max(r.sent_bytes for r in results) / 2**20,
        "client_sent_mib_total": sum(r.sent_bytes for r in results) / 2**20,
        **(_memory_fields(memory) if memory is not None else {}),
    }


def _memory_fields(memory: MemoryPeak) -> dict[str, float]:
    return {
        "server_rss_before_mib": memory.before / 2**20,
        "server_rss_peak_mib": memory.peak / 2**20,
        "server_rss_after_mib": memory.after / 2**20,
    }


def large_input_queue(
    url: str,
    pid: int | None,
    side: int = 6000,
    num_images: int = 8,
    submissions: int = 8,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """A queue filled with large inputs (``side`` x ``side`` PNGs, ``num_images`` each) behind a long
    first task: what was accepted or refused, the server's memory while they wait, and after they
    are canceled."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    image, mask = _png_data_url(side, side, False, 0, flat=True), _png_data_url(side, side, True, 0)
    blocker_image = _png_data_url(1024, 1024, False, 1), _png_data_url(1024, 1024, True, 1)
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client:
        # A long first task (the most steps, four images) keeps the worker busy: the next ones wait.
        blocker = client.post(
            "/v1/tasks",
            json={
                "prompt": "blocker",
                "image": blocker_image[0],
                "mask": blocker_image[1],
                "num_inference_steps": 100,
                "num_images": 4,
            },
        ).json()
        accepted: list[str] = []
        statuses: list[int] = []
        messages: set[str] = set()
        payload = {"prompt": "large", "image": image, "mask": mask, "num_images": num_images}
        with contextlib.ExitStack() as stack:
            memory = stack.enter_context(MemoryPeak(pid)) if pid is not None else None
            for _ in range(submissions):
                answer = client.post("/v1/tasks", json={**payload, "num_inference_steps": 2})
                statuses.append(answer.status_code)
                if answer.status_code == 201:
                    accepted.append(answer.json()["id"])
                else:
                    messages.add(answer.json().get("error", ""))
            queued_rss = rss_bytes(pid) if pid is not None else 0
            blocker_status = client.get(f"/v1/tasks/{blocker['id']}").json()["status"]
            for task_id in [*accepted, blocker["id"]]:
                client.post(f"/v1/tasks/{task_id}/cancel")
            time.sleep(1.0)
    return {
        "input": f"{side}x{side} PNG ({len(image) * 3 // 4 // 1024} KiB), num_images {num_images}",
        "submissions": submissions,
        "answers": statuses,
        "accepted": len(accepted),
        "refusals": sorted(messages),
        "first_task_still_running": blocker_status == "running",  # else a large one ran: its pixels count
        **(_memory_fields(memory) if memory is not None else {}),
        **({"server_rss_queued_mib": queued_rss / 2**20} if pid is not None else {}),
    }


@contextlib.contextmanager
def _spawned(flags: list[str]) -> Any:
    """A ``fluxfill serve`` subprocess on the tiny model: ``(url, process, health)``."""
    import socket

    with tempfile.TemporaryDirectory() as data_dir:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = _spawn_server(Path(data_dir), port, flags)
        try:
            url = f"http://127.0.0.1:{port}"
            yield url, process, wait_ready(url, process)
        finally:
            process.terminate()
            process.wait(30)


# The spawned server's --shutdown-grace-s in the SIGTERM case: short against the long task it interrupts.
SHUTDOWN_GRACE_S = 5.0


def run_hostile(args: argparse.Namespace) -> int:
    """``--hostile``: the cases of issue 23 that have a figure, each against a spawned tiny-model server
    with ``--server-flags``: twenty unauthenticated 60 MiB uploads at once (then the same with the key,
    bodies read under ``--max-inflight-mb``), a queue filled with 36-megapixel inputs of eight images
    each, and SIGTERM with clients connected (:func:`sigterm_to_exit`, ``--shutdown-grace-s``
    :data:`SHUTDOWN_GRACE_S`). 1 when an unauthenticated upload was answered other than 401."""
    from .arguments import command_line

    flags = args.server_flags.split()
    key = "bench-key"
    with _spawned([*flags, "--api-key", key]) as (url, process, health):
        unread = refused_unread_uploads(url, process.pid, uploads=20, declared_mb=60.0)
        with MemoryPeak(process.pid) as memory:
            keyed = _keyed_uploads(url, key, uploads=20, declared_mb=60.0)
        keyed.update(_memory_fields(memory))
    with _spawned(flags) as (url, process, _):
        queue = large_input_queue(url, process.pid, side=6000, num_images=8, submissions=8)
    with _spawned([*flags, "--max-queue-megapixels", "4096"]) as (url, process, _):  # all eight queue
        whole_queue = large_input_queue(url, process.pid, side=6000, num_images=8, submissions=8)
    with _spawned([*flags, "--shutdown-grace-s", str(SHUTDOWN_GRACE_S)]) as (url, process, _):
        shutdown = sigterm_to_exit(url, process, SHUTDOWN_GRACE_S)
    record = {
        "unauthenticated_uploads": unread,
        "authenticated_uploads": keyed,
        "large_input_queue": queue,
        "large_input_queue_4096": whole_queue,
        "sigterm_to_exit": shutdown,
        "server": health,
        "flags": " ".join(flags),
        "command": command_line(args),
        "machine": _machine(),
    }
    markdown = hostile_markdown(record)
    print(markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".md").write_text(markdown)
    return 0 if unread["answered_401"] == unread["uploads"] else 1


def _keyed_uploads(url: str, key: str, uploads: int, declared_mb: float) -> dict[str, Any]:
    """The same uploads with the key: their bodies (not JSON) read whole, under the in-flight bound."""
    from concurrent.futures import ThreadPoolExecutor

    declared = int(declared_mb * 2**20)
    headers = {"Authorization": f"Bearer {key}"}
    with ThreadPoolExecutor(uploads) as pool:
        results = list(
            pool.map(
                lambda _: unread_upload(url, "/v1/tasks", declared, headers, timeout=120), range(uploads)
            )
        )
    return {
        "uploads": uploads,
        "declared_mib_each": declared_mb,
        "answers": sorted(str(r.status) for r in results),
        "answer_max_s": max(r.seconds for r in results),
    }


def _machine() -> str:
    import os

    cores = os.cpu_count()
    return f"{platform.processor() or platform.machine()}, {cores} cores, {platform.system()}, CPU only"


def hostile_markdown(record: dict[str, Any]) -> str:
    """The ``--hostile`` figures as a markdown page."""
    unread, keyed = record["unauthenticated_uploads"], record["authenticated_uploads"]

    keyed_answers = keyed["answers"]

    def mib(value: float) -> str:
        return f"{value:.0f}"

    rows = [
        (
            f"{unread['uploads']} unauthenticated uploads of {unread['declared_mib_each']:g} MiB at once",
            f"answers {', '.join(unread['answers'])}; p50 {unread['answer_p50_s']:.3f} s, "
            f"max {unread['answer_max_s']:.3f} s; at most {unread['client_sent_mib_max']:.1f} MiB of one "
            "got into the connection",
        ),
        (
            "server memory (VmRSS) before / peak / after",
            f"{mib(unread['server_rss_before_mib'])} / {mib(unread['server_rss_peak_mib'])} / "
            f"{mib(unread['server_rss_after_mib'])} MiB",
        ),
        (
            "the same uploads with the key (bodies read, not JSON)",
            ", ".join(f"{keyed_answers.count(a)}x {a}" for a in sorted(set(keyed_answers)))
            + f"; max {keyed['answer_max_s']:.1f} s",
        ),
        (
            "server memory with the key, before / peak / after",
            f"{mib(keyed['server_rss_before_mib'])} / {mib(keyed['server_rss_peak_mib'])} / "
            f"{mib(keyed['server_rss_after_mib'])} MiB",
        ),
    ]
    for name, flag in (("large_input_queue", "default"), ("large_input_queue_4096", "4096")):
        queue = record[name]
        rows += [
            (
                f"queue of large inputs (--max-queue-megapixels {flag}): {queue['submissions']} submissions "
                f"of {queue['input']}",
                f"{queue['accepted']} accepted; answers {queue['answers']}; first task still running "
                f"throughout: {'yes' if queue['first_task_still_running'] else 'no'}",
            ),
            ("refusals", "; ".join(queue["refusals"]) or "-"),
            (
                "server memory: before / peak while submitting / queued / after canceling",
                f"{mib(queue['server_rss_before_mib'])} / {mib(queue['server_rss_peak_mib'])} / "
                f"{mib(queue['server_rss_queued_mib'])} / {mib(queue['server_rss_after_mib'])} MiB",
            ),
        ]
    shutdown = record["sigterm_to_exit"]
    rows.append(
        (
            f"SIGTERM to exit with clients connected (--shutdown-grace-s {shutdown['grace_s']:g}; a long "
            "task running, its event stream and a sync request waiting)",
            f"{shutdown['sigterm_to_exit_s']:.2f} s; the stream's last event: {shutdown['stream_last_event']}; "
            f"the sync request: {shutdown['sync_answer']}"
            + (f" ({shutdown['note']})" if shutdown.get("note") else ""),
        )
    )
    lines = [
        "# `fluxfill serve` against hostile and careless clients",
        "",
        f"Server: {record['server'].get('model')} model on {record['server'].get('device')}, "
        f"{record['flags'] or 'default flags'}. Machine: {record['machine']}.",
        "",
        "Command: `" + record["command"] + "`",
        "",
        "| case | result |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    return "\n".join(lines)


def serve_command(data_dir: Path, port: int, flags: Sequence[str] = ()) -> list[str]:
    """The command line of ``fluxfill serve`` on ``port`` with its data in ``data_dir``."""
    command = [sys.executable, "-m", "fluxfill_engine", "serve", "--port", str(port)]
    return [*command, "--data-dir", str(data_dir), *flags]


def _spawn_server(data_dir: Path, port: int, flags: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        serve_command(data_dir, port, flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """``/healthz`` of ``url`` once it answers 200 (ready); raises if ``process`` exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            answer = httpx.get(f"{url}/healthz", timeout=2)
            if answer.status_code == 200:
                return answer.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} was not ready after {timeout} s")


def report_markdown(summary: dict[str, Any], settings: dict[str, Any], health: dict[str, Any]) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [
        ("requests sent (open loop)", f"{summary['requests']} at {settings['rate']}/s"),
        ("accepted (201)", summary["accepted"]),
        ("refused 429 (queue full)", f"{summary['rejected_429']} ({summary['rate_429']:.1%})"),
        ("completed / failed", f"{summary['completed']} / {summary['failed']}"),
        ("latency p50 (s)", seconds(summary["latency_p50_s"])),
        ("latency p99 (s)", seconds(summary["latency_p99_s"])),
        ("throughput (tasks/s)", seconds(summary["throughput_tasks_per_s"])),
        (
            "mean batch size",
            "-" if summary["mean_batch_size"] is None else f"{summary['mean_batch_size']:.2f}",
        ),
        (
            "every accepted task ended exactly once",
            "yes" if summary["every_accepted_task_ended_once"] else "NO",
        ),
    ]
    lines = [
        "# `fluxfill serve` open-loop load test",
        "",
        f"Server: {health.get('model')} model, preset {health.get('preset')}, device {health.get('device')}; "
        f"{settings['flags'] or 'default flags'}. Machine: {platform.processor() or platform.machine()}, "
        f"{platform.system()}.",
        f"Requests: {settings['size']}x{settings['size']} input, {settings['steps']} steps, "
        f"max_megapixels {settings['max_megapixels']}.",
        "",
        "Command: `" + settings["command"] + "`",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fluxfill bench serve-load``'s arguments."""
    parser.add_argument("--url", help="a running server (default: start `fluxfill serve` on the tiny model)")
    parser.add_argument("--requests", type=int, default=200, help="requests to send (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default: %(default)s)")
    parser.add_argument(
        "--max-megapixels", type=float, default=0.065, help="working resolution (default: %(default)s)"
    )
    parser.add_argument("--api-key", help="bearer key for --url")
    parser.add_argument(
        "--server-flags", default="--max-queue 32", help="flags for the spawned server (default: %(default)r)"
    )
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--hostile",
        action="store_true",
        help="instead of the load: unauthenticated uploads refused unread, a queue of large inputs and "
        "SIGTERM with clients connected, each against a spawned server (its memory from /proc)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the load, print the markdown table, write ``OUT.json`` and ``OUT.md``; 1 when a task did not
    end exactly once or an answer was neither 201 nor 429."""
    from .arguments import command_line

    if args.requests < 1 or args.rate <= 0:
        raise BenchError("--requests must be >= 1 and --rate > 0")
    if args.hostile:
        return run_hostile(args)
    process = None
    with tempfile.TemporaryDirectory() as data_dir:
        url = args.url
        flags = [] if args.url else args.server_flags.split()
        if url is None:
            import socket

            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            process = _spawn_server(Path(data_dir), port, flags)
            url = f"http://127.0.0.1:{port}"
        try:
            health = wait_ready(url, process)
            start = time.perf_counter()
            outcomes = asyncio.run(
                run_load(
                    url, args.requests, args.rate, args.size, args.steps, args.max_megapixels, args.api_key
                )
            )
            summary = summarize(outcomes, time.perf_counter() - start)
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
    settings = {
        "rate": args.rate,
        "size": args.size,
        "steps": args.steps,
        "max_megapixels": args.max_megapixels,
        "flags": " ".join(flags),
        "command": command_line(args),
    }
    markdown = report_markdown(summary, settings, health)
    print(markdown)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "summary": summary,
            "settings": settings,
            "server": health,
            "outcomes": [asdict(o) for o in outcomes],
        }
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".md").write_text(markdown)
    return 0 if summary["every_accepted_task_ended_once"] and not summary["other_status"] else 1


def sigterm_to_exit(
    url: str, process: subprocess.Popen, grace_s: float, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """SIGTERM to a spawned server (started with ``--shutdown-grace-s grace_s``) while a long task runs,
    with an event stream on it and a sync-mode WaveSpeed request waiting behind it: the seconds from the
    signal to the process's exit, and how each client was answered (issue 23: a bounded grace, then the
    running task canceled with its closing event and every connection closed)."""
    import signal

    import httpx

    headers = headers or {}
    image, mask = _png_data_url(512, 512, False, 0), _png_data_url(512, 512, True, 0)
    # Long enough on the tiny model to still run after the grace.
    long = {
        "prompt": "bench",
        "image": image,
        "mask": mask,
        "num_inference_steps": 100,
        "max_megapixels": 1.0,
    }
    submitted = httpx.post(f"{url}/v1/tasks", json=long, headers=headers, timeout=60)
    if submitted.status_code != 201:
        raise BenchError(f"the long task was refused: {submitted.status_code} {submitted.text[:200]}")
    task = submitted.json()
    answers: dict[str, Any] = {"stream_events": []}

    def stream() -> None:
        try:
            with httpx.stream(
                "GET", f"{url}/v1/tasks/{task['id']}/events", headers=headers, timeout=None
            ) as s:
                answers["stream_events"] = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
        except httpx.HTTPError as err:
            answers["stream_error"] = type(err).__name__

    def sync_request() -> None:
        payload = {**long, "num_inference_steps": 2, "enable_sync_mode": True}
        try:
            answer = httpx.post(
                f"{url}/api/v3/wavespeed-ai/flux-fill-dev", json=payload, headers=headers, timeout=None
            )
            answers["sync_answer"] = f"{answer.status_code} {answer.json()['data']['status']}"
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
            answers["sync_answer"] = type(err).__name__

    clients = [threading.Thread(target=stream), threading.Thread(target=sync_request)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 120
    while "task_output" not in answers["stream_events"] and time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/tasks/{task['id']}", headers=headers).json()["status"]
        if status == "running":
            break
        time.sleep(0.1)
    time.sleep(1.0)  # both clients connected and waiting
    signaled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    process.wait(grace_s + 120)
    seconds = time.perf_counter() - signaled
    for client in clients:
        client.join(30)
    events = answers["stream_events"]
    return {
        "grace_s": grace_s,
        "sigterm_to_exit_s": round(seconds, 2),
        "stream_last_event": events[-1] if events else answers.get("stream_error"),
        "sync_answer": answers.get("sync_answer"),
    }
