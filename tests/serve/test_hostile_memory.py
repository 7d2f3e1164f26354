"""What careless and hostile clients may cost a real server (issue 23, items 1, 2, 4 and 6), on loopback:

- a body is not read before the API key is checked from the headers; a half-sent body is cut off after
  ``body_timeout_s`` (408); the bodies in flight together are bounded (503 with ``Retry-After``);
- queued tasks hold their inputs as files, not pixels, and weigh in the queue by megapixels x images
  (413 alone over the bound, 429 when the queue is full of them); canceling them deletes the files;
- LoRA URLs are downloaded only for a request that will run, into a cache bounded in bytes;
- requests with slow URLs do not hold up the others.

Memory figures are the server's ``VmRSS`` from ``/proc/PID/status``.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import PIL.Image
import pytest

from fluxfill_engine.bench.serve_load import MemoryPeak, refused_unread_uploads, unread_upload
from fluxfill_engine.serve.inputs import ServerOptions
from fluxfill_engine.serve.lora_cache import LoraCache
from fluxfill_engine.serve.urlguard import UrlPolicy
from tests.support.serve import (
    InstantEngine,
    body,
    data_url,
    inputs,
    make_app,
    server_in_thread,
    server_process,
    wait_status,
)

KEY = {"Authorization": "Bearer key-one"}


def post(url: str, timeout: float = 60.0, **fields: Any) -> httpx.Response:
    """``httpx.post`` with room for a loaded machine (a server's first request imports the engine)."""
    return httpx.post(url, timeout=timeout, **fields)


class GatedEngine(InstantEngine):
    """:class:`InstantEngine` whose passes wait for ``gate`` (set: they run at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def run_batch(self, requests: list[Any], on_event: Callable | None = None) -> list[Any]:
        assert self.gate.wait(60)
        return super().run_batch(requests, on_event)


@pytest.fixture
def gated() -> Iterator[GatedEngine]:
    engine = GatedEngine()
    yield engine
    engine.gate.set()


def raw_post(
    base: str, path: str, headers: dict[str, str], declared: int, sent: bytes = b""
) -> socket.socket:
    """A POST over a plain socket: its headers, ``declared`` as its Content-Length, and ``sent`` of it."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {declared}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + sent)
    return sock


def answer_of(sock: socket.socket) -> tuple[int, bytes, bool]:
    """(status, the raw answer, whether the server closed the connection after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    sock.settimeout(0.3)  # a refusal's close comes at once; a kept-alive answer times out here
    try:
        closed = sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        closed = True
    sock.close()
    return int(head.split()[1]), head + b"\r\n\r\n" + rest, closed


# ---- item 1: the key before the body, a deadline on it, a bound on bodies in flight ---------------------


def test_a_wrong_or_missing_key_is_refused_from_the_headers_before_any_body(tmp_path):
    with server_in_thread(make_app(tmp_path, InstantEngine(), api_keys=("key-one",))) as base:
        for headers in ({}, {"Authorization": "Bearer key-two"}):
            sock = raw_post(base, "/v1/tasks", headers, declared=50_000_000)  # headers only, no byte of body
            status, raw, closed = answer_of(sock)
            assert status == 401 and b"API key" in raw and closed
        wavespeed = raw_post(base, "/api/v3/wavespeed-ai/flux-fill-dev", {}, declared=10_000)
        status, raw, _ = answer_of(wavespeed)
        assert status == 401 and b'"code":401' in raw  # in WaveSpeed's shape
        # With the key, the same headers get their body read: a request that sends it is answered.
        task = post(f"{base}/v1/tasks", json=body(), headers=KEY)
        assert task.status_code == 201


def test_a_body_over_the_limit_is_refused_by_its_declared_length_before_it_is_sent(tmp_path):
    with server_in_thread(make_app(tmp_path, InstantEngine(), max_request_bytes=1000)) as base:
        status, raw, closed = answer_of(raw_post(base, "/v1/tasks", {}, declared=1001))
        assert status == 413 and b"1000 bytes" in raw and closed


def test_a_half_sent_body_is_cut_off_with_408_after_the_deadline(tmp_path):
    with server_in_thread(make_app(tmp_path, InstantEngine(), body_timeout_s=0.5)) as base:
        start = time.perf_counter()
        sock = raw_post(base, "/v1/tasks", {"Content-Type": "application/json"}, 1000, b'{"prompt": ')
        status, raw, closed = answer_of(sock)
        waited = time.perf_counter() - start
        assert status == 408 and b"--body-timeout-s" in raw and closed
        assert 0.5 <= waited < 3.0, waited
        assert post(f"{base}/v1/tasks", json=body()).status_code == 201  # the server is fine


def test_bodies_in_flight_together_are_bounded(tmp_path):
    app = make_app(tmp_path, InstantEngine(), max_inflight_bytes=1000, body_timeout_s=10)
    with server_in_thread(app) as base:
        first = raw_post(base, "/v1/tasks", {"Content-Type": "application/json"}, 900, b"[" + b" " * 599)
        time.sleep(0.5)  # its 600 bytes read and counted
        status, raw, closed = answer_of(raw_post(base, "/v1/tasks", {}, declared=500))
        assert status == 503 and b"--max-inflight-mb" in raw and b"retry-after: 1" in raw.lower() and closed
        first.sendall(b" " * 299 + b"]")
        assert answer_of(first)[0] == 400  # read whole and answered: a list is not a request
        again = raw_post(base, "/v1/tasks", {"Content-Type": "application/json"}, 500, b"x" * 500)
        assert answer_of(again)[0] == 400  # the bytes of the first were given back
        unsized = post(f"{base}/v1/tasks", content=iter([b" " * 600] * 3))  # chunked: counted as read
        assert unsized.status_code == 503 and "--max-inflight-mb" in unsized.json()["error"]


@pytest.mark.slow
def test_unauthenticated_large_uploads_leave_the_servers_memory_flat(tmp_path):
    """Twenty unauthenticated 60 MiB uploads at once, sent as fast as the server takes them: each answered
    401 in well under a second, the server's memory within a few MiB of where it was (reading them would
    take 1.2 GiB)."""
    with server_process(tmp_path, "--api-key", "key-one") as (base, process):
        figures = refused_unread_uploads(base, process.pid, uploads=20, declared_mb=60.0)
    assert figures["answered_401"] == 20, figures
    assert figures["answer_max_s"] < 5.0, figures
    read_whole = 20 * 60.0
    assert figures["server_rss_peak_mib"] - figures["server_rss_before_mib"] < read_whole / 20, figures
    assert figures["client_sent_mib_max"] < 60.0 / 4, figures  # the rest was never taken


def test_an_upload_answer_does_not_wait_for_its_body(tmp_path):
    with server_in_thread(make_app(tmp_path, InstantEngine(), api_keys=("key-one",))) as base:
        upload = unread_upload(base, "/v1/tasks", 200 * 2**20, timeout=10)
    assert upload.status == 401 and upload.seconds < 5 and upload.sent_bytes < 50 * 2**20, upload


# ---- item 2: queued tasks hold files, weigh in the queue by megapixels x images ----------------------


def _large_body(side: int, num_images: int = 1, **fields: Any) -> dict[str, Any]:
    image = PIL.Image.new("RGB", (side, side), (40, 120, 200))  # one colour: a small PNG, many pixels
    mask = PIL.Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return body(image=data_url(image), mask=data_url(mask), num_images=num_images, **fields)


def _block_worker(base: str) -> dict[str, Any]:
    """A first task that holds the gated engine, so that the next ones wait in the queue."""
    first = post(f"{base}/v1/tasks", json=body(prompt="first")).json()
    wait_status(base, first["id"], {"running"})
    return first


@pytest.mark.slow
def test_a_queue_of_large_inputs_holds_files_not_pixels_and_cancel_deletes_them(tmp_path, gated):
    side, tasks = 3000, 10  # 9 megapixels each: 36 MB of pixels (image and mask) a task if decoded and kept
    with server_in_thread(make_app(tmp_path, gated, max_queue_megapixels=1e6)) as base:
        _block_worker(base)
        payload = _large_body(side)
        post(
            f"{base}/v1/tasks", json=payload, timeout=120
        ).raise_for_status()  # warm: the decoders' first use
        with MemoryPeak(_own_pid()) as memory:
            queued = [post(f"{base}/v1/tasks", json=payload, timeout=120).json() for _ in range(tasks)]
        held_if_decoded = tasks * side * side * 4
        assert all(task["status"] == "queued" for task in queued)
        assert memory.after - memory.before < held_if_decoded / 3, (memory.before, memory.after)
        folders = {path.name for path in (tmp_path / "inputs").iterdir()}
        assert {task["id"] for task in queued} <= folders
        for task in queued:
            assert post(f"{base}/v1/tasks/{task['id']}/cancel").json()["status"] == "canceled"
        assert not {task["id"] for task in queued} & {path.name for path in (tmp_path / "inputs").iterdir()}
        gated.gate.set()


def _own_pid() -> int:
    import os

    return os.getpid()


def test_admission_weighs_megapixels_times_images_and_names_the_limit(tmp_path, gated):
    image_mp = 256 * 256 / 1e6  # body()'s image
    limit = 3.5 * image_mp * 2  # three tasks of two images fit, a fourth does not
    with server_in_thread(make_app(tmp_path, gated, max_queue_megapixels=limit)) as base:
        _block_worker(base)  # running: no longer in the queue's weight
        alone = post(f"{base}/v1/tasks", json=_large_body(1024))
        assert alone.status_code == 413 and "--max-queue-megapixels" in alone.json()["error"]
        assert alone.json()["field"] == "num_images"
        fitting = [post(f"{base}/v1/tasks", json=body(num_images=2)) for _ in range(3)]
        assert [answer.status_code for answer in fitting] == [201, 201, 201]
        full = post(f"{base}/v1/tasks", json=body(num_images=2))
        assert full.status_code == 429 and "--max-queue-megapixels" in full.json()["error"]
        assert int(full.headers["Retry-After"]) >= 1
        assert post(f"{base}/v1/tasks", json=body(num_images=1)).status_code == 201  # what still fits
        post(f"{base}/v1/tasks/{fitting[0].json()['id']}/cancel")
        assert post(f"{base}/v1/tasks", json=body(num_images=2)).status_code == 201  # room again
        gated.gate.set()
        for answer in fitting[1:]:
            assert wait_status(base, answer.json()["id"], {"completed", "failed"})["status"] == "completed"


# ---- item 4: LoRA downloads only for a request that runs, into a bounded cache --------------------------


class Files(http.server.ThreadingHTTPServer):
    """A loopback file server: ``files[path]`` bytes; ``gets`` counts the GETs per path; ``hold``, when
    set, makes every GET wait for it (a slow server)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.gets = files, {}
        self.hold: threading.Event | None = None
        super().__init__(("127.0.0.1", 0), _FileHandler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _FileHandler(http.server.BaseHTTPRequestHandler):
    server: Files

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.gets[self.path] = self.server.gets.get(self.path, 0) + 1
        if self.server.hold is not None:
            self.server.hold.wait(30)
        data = self.server.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")


@pytest.fixture
def files() -> Iterator[Files]:
    server = Files({})
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    if server.hold is not None:
        server.hold.set()
    server.shutdown()
    server.server_close()


def _url_options(**fields: Any) -> ServerOptions:
    policy = UrlPolicy(allow=True, trusted_networks=("127.0.0.1/32",), timeout_s=30.0)
    return ServerOptions(url_policy=policy, **fields)


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory) -> bytes:
    """A real LoRA file of the tiny model (kohya's layout), made here."""
    from tests.support import lora as lora_helpers

    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    return lora_helpers.kohya_lora(path, seed=0).read_bytes()


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_lora_urls_are_downloaded_only_for_requests_that_run(tmp_path, gated, files, lora_bytes):
    files.files["/style.safetensors"] = lora_bytes
    lora = [{"path": files.url("/style.safetensors"), "scale": 0.8}]
    app = make_app(tmp_path, gated, options=_url_options(), max_queue=1)
    with server_in_thread(app) as base:
        refused = [
            post(f"{base}/v1/tasks", json=body(loras=lora, num_inference_steps=0)),
            post(f"{base}/v1/tasks", json=body(loras=lora, image="bm90IGFuIGltYWdl")),
            post(f"{base}/v1/tasks", json=body(loras=lora, guidance_scale="strong")),
        ]
        assert [answer.status_code for answer in refused] == [422, 400, 422]
        assert files.gets == {}
        _block_worker(base)
        queued = post(f"{base}/v1/tasks", json=body(loras=lora))
        assert queued.status_code == 201 and files.gets == {"/style.safetensors": 1}
        full = post(f"{base}/v1/tasks", json=body(loras=[{"path": files.url("/other.safetensors")}]))
        assert full.status_code == 429 and "/other.safetensors" not in files.gets
        post(f"{base}/v1/tasks/{queued.json()['id']}/cancel")
        again = post(f"{base}/v1/tasks", json=body(loras=lora))
        assert again.status_code == 201 and files.gets == {"/style.safetensors": 1}  # from the cache
        assert _metric(base, "fluxfill_lora_cache_bytes") == len(lora_bytes)
        assert _metric(base, "fluxfill_lora_downloads") == 1
        assert [path.stat().st_size for path in (tmp_path / "lora-cache").iterdir()] == [len(lora_bytes)]
        gated.gate.set()  # the server stops without waiting on the held pass


def test_the_lora_cache_keeps_its_bound_least_recently_used_out(tmp_path, files, lora_bytes):
    for name in ("a", "b", "c"):
        files.files[f"/{name}.safetensors"] = lora_bytes
    options = _url_options(lora_cache_bytes=int(len(lora_bytes) * 2.5))
    with server_in_thread(make_app(tmp_path, InstantEngine(), options=options)) as base:

        def run(name: str) -> None:
            request = body(loras=[{"path": files.url(f"/{name}.safetensors")}])
            task = post(f"{base}/v1/tasks", json=request).json()
            assert wait_status(base, task["id"], {"completed", "failed"})["status"] == "completed"

        for name in ("a", "b", "a", "c"):  # b is then the least recently used: out, a and c kept
            run(name)
        assert files.gets == {"/a.safetensors": 1, "/b.safetensors": 1, "/c.safetensors": 1}
        assert _metric(base, "fluxfill_lora_cache_bytes") == 2 * len(lora_bytes)
        assert _metric(base, "fluxfill_lora_cache_files") == 2
        run("b")  # gone: fetched again, and a (now the oldest) goes
        assert files.gets["/b.safetensors"] == 2 and _metric(base, "fluxfill_lora_cache_files") == 2
        run("c")
        assert files.gets["/c.safetensors"] == 1


def test_the_lora_cache_never_deletes_a_file_in_use(tmp_path):
    in_use: set[str] = set()
    cache = LoraCache(tmp_path, max_bytes=150, in_use=lambda: in_use)
    first = cache.get("http://x/1", lambda: b"1" * 100)
    in_use.add(str(first))
    second = cache.get("http://x/2", lambda: b"2" * 100)
    assert first.exists() and second.exists() and cache.usage() == (2, 200)  # over, until 1 is free
    in_use.clear()
    third = cache.get("http://x/3", lambda: b"3" * 10)
    assert not first.exists() and second.exists() and third.exists() and cache.usage() == (2, 110)
    with pytest.raises(ValueError, match="max_bytes"):
        LoraCache(tmp_path, max_bytes=0)


# ---- item 6: slow URL inputs do not hold up other submissions -----------------------------------------


@pytest.mark.slow
def test_slow_url_downloads_do_not_delay_an_ordinary_submission(tmp_path, files):
    image, mask = inputs()
    from tests.support.serve import png_bytes

    files.files.update({"/image.png": png_bytes(image), "/mask.png": png_bytes(mask)})
    files.hold = threading.Event()
    slow = body(image=files.url("/image.png"), mask=files.url("/mask.png"))
    app = make_app(tmp_path, InstantEngine(), options=_url_options(), url_fetches=4)
    with server_in_thread(app) as base, ThreadPoolExecutor(45) as pool:
        pending = [pool.submit(httpx.post, f"{base}/v1/tasks", json=slow, timeout=60) for _ in range(45)]
        deadline = time.monotonic() + 10
        while files.gets.get("/image.png", 0) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # every slow request has reached the server by now
        assert files.gets["/image.png"] == 4  # at most url_fetches fetch at once; the others wait
        start = time.perf_counter()
        ordinary = post(f"{base}/v1/tasks", json=body(), timeout=30)
        waited = time.perf_counter() - start
        assert ordinary.status_code == 201 and waited < 2.0, waited
        files.hold.set()
        assert {future.result().status_code for future in pending} == {201}


# ---- the flags ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag",
    ["--body-timeout-s", "--max-inflight-mb", "--max-queue-megapixels", "--url-fetches", "--lora-cache-mb"],
)
def test_the_limits_flags_must_be_positive(flag, capsys):
    from fluxfill_engine.cli import main

    assert main(["serve", flag, "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and flag in error and "Traceback" not in error


def test_the_limits_flags_reach_the_server(monkeypatch):
    """``fluxfill serve``'s limits flags, as the app gets them (uvicorn not started)."""
    from fluxfill_engine.cli import main
    from fluxfill_engine.serve import main as serve_main

    seen: dict[str, Any] = {}

    def capture(config: Any, factory: Any, **addons: Any) -> Any:
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(serve_main, "create_app", capture)
    flags = ["--body-timeout-s", "7", "--max-inflight-mb", "3", "--max-queue-megapixels", "50"]
    with pytest.raises(SystemExit):
        main(["serve", *flags, "--url-fetches", "2", "--lora-cache-mb", "5"])
    config = seen["config"]
    assert config.body_timeout_s == 7 and config.max_inflight_bytes == 3 * 2**20 and config.url_fetches == 2
    assert config.service.max_queue_megapixels == 50 and config.options.lora_cache_bytes == 5 * 2**20


def test_the_allocator_gives_large_blocks_back_on_glibc():
    import platform

    from fluxfill_engine.serve.allocator import return_large_blocks

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert return_large_blocks() == glibc
