"""The official ``wavespeed`` Python SDK, unchanged but for its base URL, against a live ``fluxfill serve``
on loopback: uploads (its ticket and PUT, and the binary upload), ``run`` with polling and in sync mode,
``get_result``, and the errors it turns into its own messages. Images are compared with the engine's
own for the same request and seed.
"""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import PIL.Image
import pytest

from fluxfill_engine.serve.api import wavespeed as wavespeed_routes
from fluxfill_engine.serve.uploads import UploadStore
from tests.support.serve import (
    FAST,
    SlowSteps,
    fetched_image,
    inputs,
    make_app,
    png_bytes,
    server_in_thread,
    solo_image,
)

wavespeed = pytest.importorskip("wavespeed")

MODEL = "wavespeed-ai/flux-fill-dev"
KEY, OTHER_KEY = "key-of-alice", "key-of-bob"


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_engine):
    app = make_app(tmp_path_factory.mktemp("ws"), shared_engine, api_keys=(KEY, OTHER_KEY))
    with server_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The test inputs as PNG files: the image and its mask."""
    folder = tmp_path_factory.mktemp("inputs")
    image, mask = inputs()
    (folder / "cup.png").write_bytes(png_bytes(image))
    (folder / "mask.png").write_bytes(png_bytes(mask))
    return folder / "cup.png", folder / "mask.png"


def client(base: str, key: str = KEY) -> Any:
    return wavespeed.Client(api_key=key, base_url=base, max_connection_retries=0)


def test_upload_then_run_gives_the_engines_image(server, files, shared_engine):
    """WaveSpeed's documented flow: upload the inputs, run (polling), read the result; the download URLs
    work as inputs without --allow-url-inputs, and the default enable_safety_checker runs unchecked."""
    sdk = client(server)
    image_url = sdk.upload(str(files[0]))
    with files[1].open("rb") as stream:  # a file object, as the SDK also takes
        mask_url = sdk.upload(stream)
    assert image_url.startswith(f"{server}/v1/uploads/") and image_url.endswith("/cup.png")
    request = {"prompt": "a white paper cup", "image": image_url, "mask_image": mask_url, "seed": 4, **FAST}
    output = sdk.run(MODEL, {**request, "enable_safety_checker": True}, poll_interval=0.05)
    (url,) = output["outputs"]
    picture = np.asarray(fetched_image(server, url), dtype=np.float32)
    np.testing.assert_array_equal(picture, solo_image(shared_engine, 4))

    task_id = url.split("/v1/files/")[1].split("/")[0]
    result = sdk.get_result(task_id)["data"]
    assert result["status"] == "completed" and result["outputs"] == [url]
    # No checker on this server: no flags claimed, and the prediction says why.
    assert result["has_nsfw_contents"] == [] and result["safety_checker"] == "not configured"
    answer = httpx.get(
        f"{server}/api/v3/predictions/{task_id}/result", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert answer.headers[wavespeed_routes.SAFETY_HEADER] == "not-configured"


def test_module_functions_sync_mode_and_jpg(server, files, monkeypatch):
    """``wavespeed.upload`` and ``wavespeed.run`` (the module's default client) in sync mode, JPEG output
    asked for as "jpg"."""
    monkeypatch.setattr(wavespeed.config.api, "api_key", KEY)
    monkeypatch.setattr(wavespeed.config.api, "base_url", server)
    monkeypatch.setattr(wavespeed.api, "_default_client", None)
    image_url, mask_url = wavespeed.upload(str(files[0])), wavespeed.upload(str(files[1]))
    request = {"prompt": "a cup", "image": image_url, "mask_image": mask_url, "output_format": "jpg", **FAST}
    output = wavespeed.run(MODEL, request, enable_sync_mode=True)
    (url,) = output["outputs"]
    picture = fetched_image(server, url)
    assert picture.format == "JPEG" and picture.size == (256, 256) and url.endswith(".jpeg")


def test_sdk_errors(server, files):
    """What the SDK raises: a wrong key (401), an unknown model (404) and a missing mask (named
    ``mask_image``), each in WaveSpeed's error shape."""
    image_url = client(server).upload(str(files[0]))
    with pytest.raises(RuntimeError, match="HTTP 401") as wrong_key:
        client(server, "not-a-key").run(MODEL, {"prompt": "x", "image": image_url})
    assert '"code":401' in str(wrong_key.value).replace(" ", "")
    with pytest.raises(RuntimeError, match="Failed to create upload: HTTP 401"):
        client(server, "not-a-key").upload(str(files[0]))
    with pytest.raises(RuntimeError, match="HTTP 404") as unknown:
        client(server).run("wavespeed-ai/flux-dev", {"prompt": "x"})
    assert '"data":null' in str(unknown.value).replace(" ", "") and "wavespeed-ai/flux-dev" in str(
        unknown.value
    )
    with pytest.raises(RuntimeError, match="HTTP 422") as no_mask:
        client(server).run(MODEL, {"prompt": "x", "image": image_url, **FAST})
    assert "mask_image" in str(no_mask.value) and "`mask`" not in str(no_mask.value)


def test_uploads_belong_to_their_key(server, files):
    """Another key can neither read an upload nor use it as an input (as if it did not exist)."""
    image_url = client(server).upload(str(files[0]))
    alice, bob = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}
    assert httpx.get(image_url, headers=alice).content == files[0].read_bytes()
    assert httpx.get(image_url, headers=bob).status_code == 404
    assert httpx.get(image_url).status_code == 401
    answer = httpx.post(
        f"{server}/api/v3/{MODEL}",
        json={"prompt": "x", "image": image_url, "mask_image": image_url, **FAST},
        headers=bob,
    )
    assert answer.status_code == 422 and "image" in answer.json()["message"]
    # A URL elsewhere is still an outside fetch, refused without --allow-url-inputs.
    elsewhere = "https://example.com/v1/uploads/x/cup.png"
    answer = httpx.post(f"{server}/api/v3/{MODEL}", json={"prompt": "x", "image": elsewhere}, headers=alice)
    assert answer.status_code == 422 and "allow-url-inputs" in answer.json()["message"]


def test_binary_upload_and_native_inputs(server, files, shared_engine):
    """WaveSpeed's binary upload (multipart ``file``); its URL works as the native API's ``image`` too."""
    headers = {"Authorization": f"Bearer {KEY}"}
    urls = []
    for path in files:
        answer = httpx.post(
            f"{server}/api/v3/media/upload/binary",
            files={"file": (path.name, path.read_bytes(), "image/png")},
            headers=headers,
        )
        reply = answer.json()
        assert answer.status_code == 200 and reply["code"] == 200, reply
        assert reply["data"]["type"] == "image" and reply["data"]["size"] == path.stat().st_size
        assert reply["data"]["filename"] == path.name
        urls.append(reply["data"]["download_url"])
    task = httpx.post(
        f"{server}/v1/tasks",
        json={"prompt": "a white paper cup", "image": urls[0], "mask": urls[1], "seed": 2, **FAST},
        headers=headers,
    ).json()
    deadline = time.monotonic() + 60
    while task["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
        task = httpx.get(f"{server}/v1/tasks/{task['id']}", headers=headers).json()
    assert task["status"] == "completed", task
    picture = np.asarray(fetched_image(server, task["outputs"][0]), dtype=np.float32)
    np.testing.assert_array_equal(picture, solo_image(shared_engine, 2))
    not_an_image = httpx.post(
        f"{server}/api/v3/media/upload/binary",
        files={"file": ("a.txt", b"hello", "text/plain")},
        headers=headers,
    )
    assert not_an_image.status_code == 400 and not_an_image.json()["data"] is None
    missing = httpx.post(f"{server}/api/v3/media/upload/binary", data={"x": "1"}, headers=headers)
    assert missing.status_code == 400 and "file" in missing.json()["message"]


def test_upload_ticket_rules(server, files):
    """A ticket's PUT: the declared size, its token, once; a ticket over the request limit is refused."""
    headers = {"Authorization": f"Bearer {KEY}"}
    data = files[0].read_bytes()

    def ticket(size: int) -> dict:
        answer = httpx.post(
            f"{server}/api/v3/media/uploads", json={"filename": "cup.png", "size": size}, headers=headers
        )
        return answer.json()

    upload = ticket(len(data))["data"]["upload"]
    assert upload["method"] == "PUT"
    wrong_token = upload["url"].split("?")[0] + "?upload_token=guess"
    assert httpx.put(wrong_token, content=data).status_code == 404
    assert httpx.put(upload["url"], content=data[:-1]).status_code == 400  # not the declared size
    assert httpx.put(upload["url"], content=data).status_code == 200
    assert httpx.put(upload["url"], content=data).status_code == 409  # once
    too_big = ticket(10**12)
    assert too_big["code"] == 413 and "max-request-mb" in too_big["message"]


def test_uploads_expire_with_outputs(tmp_path):
    store = UploadStore(tmp_path / "uploads", max_bytes=2**20, retention_hours=2.0)
    image, _ = inputs()
    kept = store.add("owner", "cup.png", png_bytes(image))
    waiting, _ = store.ticket("owner", "later.png", 10)
    assert store.delete_expired(now=kept.created_at + 3599) == 0
    assert store.delete_expired(now=kept.created_at + 3700) == 1  # the ticket that got no bytes
    store.get(kept.id, "cup.png", "owner")
    assert store.delete_expired(now=kept.created_at + 2 * 3600 + 1) == 1
    assert not (tmp_path / "uploads" / kept.id).exists() and not (tmp_path / "uploads" / waiting.id).exists()


def test_the_services_clean_up_deletes_expired_uploads(tmp_path, shared_engine):
    app = make_app(tmp_path, shared_engine, retention_hours=0.0)
    store = UploadStore(tmp_path / "uploads", max_bytes=2**20, retention_hours=0.0)
    upload = store.add("owner", "cup.png", png_bytes(inputs()[0]))
    time.sleep(0.01)
    app.state.service.delete_expired()  # what the workers run every cleanup_every_s, busy or idle
    assert not (tmp_path / "uploads" / upload.id).exists()


@pytest.mark.slow
def test_sync_mode_timeout_says_to_query_later(tmp_path, shared_engine, files, monkeypatch):
    """A sync-mode request that outlasts the server's limit is answered as WaveSpeed's sync timeout: the
    SDK's error names the result URL, and the task goes on to its result."""
    monkeypatch.setattr(wavespeed_routes, "SYNC_MODE_TIMEOUT", 0.3)
    app = make_app(tmp_path, SlowSteps(shared_engine, 0.5), api_keys=(KEY,))
    with server_in_thread(app) as base:
        sdk = client(base)
        image_url, mask_url = sdk.upload(str(files[0])), sdk.upload(str(files[1]))
        request = {"prompt": "a cup", "image": image_url, "mask_image": mask_url, "seed": 1, **FAST}
        with pytest.raises(RuntimeError, match="Sync mode timed out") as timed_out:
            sdk.run(MODEL, request, enable_sync_mode=True)
        message = str(timed_out.value)
        task_id = sdk._task_id_from_error(timed_out.value)
        assert f"Query the result later at: {base}/api/v3/predictions/{task_id}/result" in message
        outcome = sdk.run_no_throw(MODEL, request, enable_sync_mode=True)
        assert outcome["status"] == "processing" and outcome["outputs"] is None
        deadline = time.monotonic() + 60
        while sdk.get_result(task_id)["data"]["status"] != "completed" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sdk.get_result(task_id)["data"]["outputs"]) == 1
        picture = PIL.Image.open(io.BytesIO(httpx.get(sdk.get_result(task_id)["data"]["outputs"][0]).content))
        assert picture.size == (256, 256)
