"""The official ``openai`` Python SDK's ``client.images.edit(...)``, unchanged but for its base URL,
against a live ``fluxfill serve`` on loopback: both response formats, OpenAI's mask convention (fully
transparent = edit), the fill options as extra form fields, and the errors the SDK raises as its own
exceptions. Images are compared with the engine's own for the same request and seed.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import PIL.Image
import pytest

from fluxfill_engine.serve.api.openai_images import flux_mask
from fluxfill_engine.serve.inputs import RequestError
from tests.support.serve import FAST, fetched_image, inputs, make_app, png_bytes, server_in_thread, solo_image

openai = pytest.importorskip("openai")

KEY = "sk-local-key"
PROMPT = "a white paper cup"


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_engine):
    app = make_app(tmp_path_factory.mktemp("openai"), shared_engine, api_keys=(KEY,))
    with server_in_thread(app) as base:
        yield base


def client(base: str, key: str = KEY) -> Any:
    return openai.OpenAI(api_key=key, base_url=f"{base}/v1", max_retries=0)


def openai_alpha(mask: PIL.Image.Image) -> PIL.Image.Image:
    """The alpha channel OpenAI's convention gives FLUX's mask: 0 (transparent) where FLUX repaints."""
    return PIL.Image.fromarray(np.where(np.asarray(mask) >= 128, 0, 255).astype(np.uint8), "L")


def openai_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """FLUX's mask (white = repaint) as OpenAI's: transparent where FLUX repaints, opaque elsewhere."""
    rgba = PIL.Image.new("RGBA", mask.size, (0, 0, 0, 255))
    rgba.putalpha(openai_alpha(mask))
    return rgba


def files() -> tuple[tuple[str, bytes, str], tuple[str, bytes, str]]:
    image, mask = inputs()
    return ("cup.png", png_bytes(image), "image/png"), ("mask.png", png_bytes(openai_mask(mask)), "image/png")


def decoded(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float32)


def test_flux_mask_inverts_openai_transparency():
    _, mask = inputs()
    np.testing.assert_array_equal(np.asarray(flux_mask(openai_mask(mask))), np.asarray(mask))
    with pytest.raises(RequestError, match="no alpha channel") as refused:
        flux_mask(mask)
    assert refused.value.field == "mask"


@pytest.mark.slow  # the module's first engine runs: ~5 s on 2 busy cores
def test_edit_b64_json_gives_the_engines_image(server, shared_engine):
    image, mask = files()
    answer = client(server).images.edit(
        image=image,
        mask=mask,
        prompt=PROMPT,
        n=1,
        size="256x256",
        response_format="b64_json",
        model="flux-fill-dev",
        user="tester",
        extra_body={"seed": 3, **FAST},
    )
    assert answer.created > 0 and len(answer.data) == 1 and answer.data[0].url is None
    assert answer.data[0].b64_json is not None
    np.testing.assert_array_equal(decoded(answer.data[0].b64_json), solo_image(shared_engine, 3))


@pytest.mark.slow  # the module's first engine runs: ~5 s on 2 busy cores
def test_edit_url_and_a_mask_from_the_images_alpha(server, shared_engine):
    """``response_format="url"``; without a mask, the image's own transparent pixels mark the area."""
    plain, mask = inputs()
    see_through = plain.convert("RGBA")
    see_through.putalpha(openai_alpha(mask))
    answer = client(server).images.edit(
        image=("cup.png", png_bytes(see_through), "image/png"),
        prompt=PROMPT,
        response_format="url",
        extra_body={"seed": 5, **FAST},
    )
    (item,) = answer.data
    assert item.url is not None and item.url.startswith(f"{server}/v1/files/") and item.b64_json is None
    picture = np.asarray(fetched_image(server, item.url), dtype=np.float32)
    np.testing.assert_array_equal(picture, solo_image(shared_engine, 5))


def test_edit_errors_are_the_sdks_exceptions(server):
    """A wrong key (refused from the headers, before the body), a mask without alpha, a value out of range,
    an unknown parameter, a mask of another size: each the SDK's own exception, naming the parameter."""
    image, mask = files()
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        client(server, "sk-wrong").images.edit(image=image, mask=mask, prompt=PROMPT)
    assert wrong_key.value.status_code == 401 and wrong_key.value.code == "invalid_api_key"
    opaque_mask = ("mask.png", png_bytes(inputs()[1]), "image/png")  # FLUX's mask: no alpha
    with pytest.raises(openai.BadRequestError, match="no alpha channel") as no_alpha:
        client(server).images.edit(image=image, mask=opaque_mask, prompt=PROMPT)
    assert no_alpha.value.param == "mask" and no_alpha.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_many:
        client(server).images.edit(image=image, mask=mask, prompt=PROMPT, n=99, extra_body=FAST)
    assert too_many.value.param == "n" and "`n`" in too_many.value.message
    with pytest.raises(openai.BadRequestError, match="Unknown parameter") as unknown:
        client(server).images.edit(image=image, mask=mask, prompt=PROMPT, extra_body={"strength": 0.5})
    assert unknown.value.param == "strength"
    small_mask = ("mask.png", png_bytes(openai_mask(inputs(128, 128)[1])), "image/png")
    with pytest.raises(openai.BadRequestError, match="the image's size") as wrong_size:
        client(server).images.edit(image=image, mask=small_mask, prompt=PROMPT)
    assert wrong_size.value.param == "mask"


def test_a_full_queue_is_the_sdks_rate_limit_error(tmp_path, shared_engine):
    app = make_app(tmp_path, shared_engine, api_keys=(KEY,), max_queue=0)  # no room, ever
    with server_in_thread(app) as base:
        image, mask = files()
        with pytest.raises(openai.RateLimitError) as full:
            client(base).images.edit(image=image, mask=mask, prompt=PROMPT, extra_body=FAST)
        assert full.value.status_code == 429 and full.value.code == "rate_limit_exceeded"
        assert int(full.value.response.headers["Retry-After"]) >= 1
