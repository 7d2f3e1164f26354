"""The playground page (``GET /``) end to end: a real ``fluxfill serve`` on loopback (the built-in tiny
model) driven by headless Chromium through Playwright: choose an image, paint a mask stroke, run, follow
the progress (Server-Sent Events), show the result; the errors a user sees; the API key path (a Bearer
header on the API, ``?token=`` on the event stream, which ``EventSource`` cannot send headers to).

Skipped only where Playwright (python) or Debian's Chromium (``/usr/bin/chromium``) is missing; CI
installs both. The screenshot of a finished run is left in ``test-artifacts/playground.png``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - CI installs it
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
SIDE = 256  # the input's size, the smallest output the engine makes
STARTUP_SECONDS = 180
RUN_MS = 120_000  # a 2-step tiny-model task on a busy CPU

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright (python) is not installed"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.slow,  # a server subprocess (torch import, tiny model) and a browser: tens of seconds
]


# ---- a real server -------------------------------------------------------------------------------


@dataclass
class Server:
    base: str
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, key: str | None = None, timeout: float = 10) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode(errors="replace")


def _get_bytes(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@contextmanager
def _serve(folder: Path, *extra: str) -> Iterator[Server]:
    """``python -m fluxfill_engine.cli serve`` on a free loopback port, until ``/healthz`` is ready."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log_path = folder / "server.log"
    command = [sys.executable, "-m", "fluxfill_engine.cli", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--data-dir", str(folder / "data"), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + STARTUP_SECONDS
            while True:
                if process.poll() is not None:
                    pytest.fail(f"`fluxfill serve` exited with {process.returncode}:\n{_tail(log_path)}")
                try:
                    status, health = _get_json(f"{base}/healthz", timeout=2)
                except OSError:  # not listening yet
                    status, health = 0, None
                if status == 200 and isinstance(health, dict) and health.get("status") == "ready":
                    break
                if isinstance(health, dict) and health.get("status") not in (None, "warming"):
                    pytest.fail(f"`fluxfill serve` is {health}:\n{_tail(log_path)}")  # e.g. "failed"
                if time.monotonic() > deadline:
                    pytest.fail(f"`fluxfill serve` not ready after {STARTUP_SECONDS} s:\n{_tail(log_path)}")
                time.sleep(0.25)
            yield Server(base, log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serve(tmp_path_factory.mktemp("serve-open")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def input_png(tmp_path: Path) -> Path:
    """A 256x256 colour gradient."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    rgb = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    path = tmp_path / "input.png"
    PIL.Image.fromarray(rgb).save(path)
    return path


# ---- driving the page ----------------------------------------------------------------------------


def _open(browser: Browser, base: str) -> tuple[Page, list[str], list[tuple[str, int, str]]]:
    """A fresh page (its own context: empty localStorage) on ``base``; the uncaught script errors and
    the event-stream answers ``(url, status, content type)`` it gets are collected."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page_errors: list[str] = []
    streams: list[tuple[str, int, str]] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on(
        "response",
        lambda r: (
            streams.append((r.url, r.status, r.headers.get("content-type", "")))
            if "/events" in r.url
            else None
        ),
    )
    page.goto(f"{base}/")
    return page, page_errors, streams


def _followed_by_sse(streams: list[tuple[str, int, str]], task_id: str) -> bool:
    """Whether the page followed the task on its event stream (not by polling, its fallback)."""
    return any(
        f"/v1/tasks/{task_id}/events" in url and status == 200 and kind.startswith("text/event-stream")
        for url, status, kind in streams
    )


def _choose_image_and_paint(page: Page, image: Path) -> None:
    """Choose ``image`` in the file input and paint one horizontal stroke across the middle of the
    mask canvas, from a quarter to three quarters of its width."""
    page.set_input_files('[data-testid="image-input"]', str(image))
    canvas = page.locator('[data-testid="mask-canvas"]')
    canvas.wait_for(state="visible")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=mask-canvas]').width > 0"
        " && document.querySelector('[data-testid=mask-canvas]').getBoundingClientRect().width > 0"
    )
    box = canvas.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 4, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 3 / 4, y, steps=12)
    page.mouse.up()


def _is_post_task(response: Any) -> bool:
    return response.request.method == "POST" and response.url.endswith("/v1/tasks")


def _wait_for_result(page: Page) -> tuple[int, int]:
    """Wait for the progress bar to reach its end and the first result image to load; its size."""
    page.wait_for_function(
        "() => { const p = document.querySelector('[data-testid=progress]');"
        " return p.max > 0 && p.value === p.max; }",
        timeout=RUN_MS,
    )
    page.wait_for_function(
        "() => { const img = document.querySelector('img[data-testid=result]');"
        " return img !== null && img.complete && img.naturalWidth > 0; }",
        timeout=RUN_MS,
    )
    width, height = page.evaluate(
        "() => { const img = document.querySelector('img[data-testid=result]');"
        " return [img.naturalWidth, img.naturalHeight]; }"
    )
    return width, height


def _decode_data_url(url: str) -> PIL.Image.Image:
    header, _, payload = url.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:40]
    image = PIL.Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


# ---- tests ---------------------------------------------------------------------------------------


def test_playground_inpaints_a_painted_mask(server: Server, browser: Browser, input_png: Path):
    page, page_errors, streams = _open(browser, server.base)
    try:
        assert page.title() == "fluxfill playground"
        _choose_image_and_paint(page, input_png)
        # The output size defaults to the input's (256x256 lies in the engine's 256-1536 range).
        assert page.input_value('[data-testid="width"]') == str(SIDE)
        assert page.input_value('[data-testid="height"]') == str(SIDE)
        page.fill('[data-testid="prompt"]', "a red apple")
        page.fill('[data-testid="steps"]', "2")
        page.fill('[data-testid="seed"]', "7")
        with page.expect_response(_is_post_task) as submitted:
            page.click('[data-testid="run"]')
        response = submitted.value
        assert response.status == 201, response.text()
        task_id = response.json()["id"]
        sent = json.loads(response.request.post_data or "{}")

        assert _wait_for_result(page) == (SIDE, SIDE)
        page.wait_for_function(
            "() => document.querySelector('[data-testid=status]').textContent.startsWith('Done')"
        )
        assert page.locator('[data-testid="error"]').is_hidden()
        assert page.locator('[data-testid="progress"]').evaluate("p => [p.value, p.max]") == [2, 2]
        download = page.locator('[data-testid="download"]')
        assert download.get_attribute("download")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        assert _followed_by_sse(streams, task_id), streams
        assert page_errors == []
    finally:
        page.close()

    # What the page sent: the image as chosen, and a black/white mask at its natural size holding the
    # stroke (a band across the middle row from about a quarter to three quarters of the width).
    assert sent["prompt"] == "a red apple"
    assert sent["num_inference_steps"] == 2 and sent["seed"] == 7 and sent["num_images"] == 1
    assert (sent["width"], sent["height"]) == (SIDE, SIDE)
    assert _decode_data_url(sent["image"]).size == (SIDE, SIDE)
    mask = np.asarray(_decode_data_url(sent["mask"]).convert("L"))
    assert mask.shape == (SIDE, SIDE)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    middle = SIDE // 2
    assert (mask[middle, SIDE // 4 + 8 : SIDE * 3 // 4 - 8] == 255).all()
    assert (mask[: middle - 40] == 0).all() and (mask[middle + 40 :] == 0).all()
    assert (mask[:, : SIDE // 4 - 40] == 0).all()

    # What the server ran: that task, finished, with the mask and the 2 steps, and its output file.
    status, task = _get_json(f"{server.base}/v1/tasks/{task_id}")
    assert status == 200, task
    assert task["status"] == "completed", task
    assert (task["progress"]["step"], task["progress"]["total"]) == (2, 2)
    assert task["seed"] == 7
    echoed = task["request"]
    # The echo names the mask's presence (`has_mask`; the images themselves are stored as files).
    assert echoed.get("has_mask", bool(echoed.get("mask") or echoed.get("mask_image"))) is True, echoed
    assert echoed["num_inference_steps"] == 2
    assert len(task["outputs"]) == 1
    with PIL.Image.open(io.BytesIO(_get_bytes(server.base + task["outputs"][0]))) as output:
        assert output.size == (SIDE, SIDE)


def test_playground_shows_errors_and_cancels(server: Server, browser: Browser, input_png: Path):
    page, page_errors, _ = _open(browser, server.base)
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    try:
        # Nothing painted and no outpaint: the page says so and sends nothing.
        page.set_input_files('[data-testid="image-input"]', str(input_png))
        page.locator('[data-testid="mask-canvas"]').wait_for(state="visible")
        page.fill('[data-testid="prompt"]', "a red apple")
        page.fill('[data-testid="steps"]', "2")
        page.click('[data-testid="run"]')
        error = page.locator('[data-testid="error"]')
        error.wait_for(state="visible")
        assert "mask" in error.inner_text().lower()
        assert posted == []

        # The server refuses a LoRA that is not a file under --lora-dir (this server has none): its
        # message is shown (an HTTP 4xx answer, or the task's task_error if it is refused later).
        _choose_image_and_paint(page, input_png)
        page.click('[data-testid="add-lora"]')
        page.fill('[data-testid="lora-path-0"]', "no-such-lora.safetensors")
        page.click('[data-testid="run"]')
        page.wait_for_function(
            "() => { const e = document.querySelector('[data-testid=error]');"
            " return !e.hidden && /lora/i.test(e.textContent); }",
            timeout=RUN_MS,
        )
        assert posted and posted[-1].endswith("/v1/tasks")
        assert page.locator('[data-testid="run"]').is_enabled()  # ready for another try

        # Cancel: a long task stopped once it has started denoising.
        page.click('[data-testid="lora-path-0"] >> xpath=../.. >> .lora-remove')
        page.fill('[data-testid="steps"]', "100")
        with page.expect_response(_is_post_task) as submitted:
            page.click('[data-testid="run"]')
        assert submitted.value.status == 201, submitted.value.text()
        task_id = submitted.value.json()["id"]
        page.wait_for_function(
            "() => document.querySelector('[data-testid=progress]').value >= 1", timeout=RUN_MS
        )
        assert page.locator('[data-testid="error"]').is_hidden()
        page.click('[data-testid="cancel"]')
        page.wait_for_function(
            "() => document.querySelector('[data-testid=status]').textContent.startsWith('Canceled')",
            timeout=RUN_MS,
        )
        assert page.locator('[data-testid="cancel"]').is_disabled()
        assert page.locator('img[data-testid="result"]').count() == 0
        assert page_errors == []
    finally:
        page.close()
    status, task = _get_json(f"{server.base}/v1/tasks/{task_id}")
    assert status == 200 and task["status"] == "canceled", task
    assert task["progress"]["step"] < 100


def test_playground_with_an_api_key(browser: Browser, input_png: Path, tmp_path: Path):
    key = "playground-test-key"
    with _serve(tmp_path / "serve-key", "--api-key", key) as server:
        page, page_errors, streams = _open(browser, server.base)
        seen: list[tuple[str, str, str | None]] = []
        page.on("request", lambda r: seen.append((r.method, r.url, r.headers.get("authorization"))))
        try:
            _choose_image_and_paint(page, input_png)
            page.fill('[data-testid="prompt"]', "a red apple")
            page.fill('[data-testid="steps"]', "2")

            # No key: the server's 401 is shown.
            with page.expect_response(_is_post_task) as refused:
                page.click('[data-testid="run"]')
            assert refused.value.status == 401
            page.locator('[data-testid="error"]').wait_for(state="visible")
            assert "API key" in page.locator('[data-testid="error"]').inner_text()

            # The key, typed once, is kept in localStorage and sent: a Bearer header on the API, a
            # `token` query parameter on the event stream.
            page.fill('[data-testid="api-key"]', key)
            page.reload()
            assert page.input_value('[data-testid="api-key"]') == key
            _choose_image_and_paint(page, input_png)
            page.fill('[data-testid="prompt"]', "a red apple")
            page.fill('[data-testid="steps"]', "2")
            with page.expect_response(_is_post_task) as submitted:
                page.click('[data-testid="run"]')
            assert submitted.value.status == 201, submitted.value.text()
            task_id = submitted.value.json()["id"]
            assert _wait_for_result(page) == (SIDE, SIDE)
            assert page.locator('[data-testid="error"]').is_hidden()
            assert _followed_by_sse(streams, task_id), streams  # the token was taken
            assert page_errors == []
        finally:
            page.close()

    api = [(method, url, auth) for method, url, auth in seen if "/v1/tasks" in url]
    assert ("POST", f"{server.base}/v1/tasks", f"Bearer {key}") in api
    assert ("GET", f"{server.base}/v1/tasks/{task_id}", f"Bearer {key}") in api
    events = [url for _, url, _ in api if url.split("?")[0].endswith(f"/v1/tasks/{task_id}/events")]
    assert events and all(url.endswith(f"?token={key}") for url in events), api
