"""Request bodies -> checked task specs (``serve.inputs``), without a server: the field of a refusal is
the one the failing check names in its error's ``field``, in the API's own spelling."""

from __future__ import annotations

import pytest

from fluxfill_engine import FillRequest
from fluxfill_engine.errors import InputError
from fluxfill_engine.serve.inputs import RequestError, ServerOptions, checked_loras, parse_task
from tests.support.serve import body


def refused(request_body: dict) -> RequestError:
    with pytest.raises(RequestError) as refusal:
        parse_task(request_body, ServerOptions())
    return refusal.value


def test_the_field_is_the_checks_not_one_read_from_the_message(monkeypatch):
    def check(self, *args, **kwargs):
        raise InputError("over the limit (and `prompt` is only mentioned here)", field="guidance_scale")

    monkeypatch.setattr(FillRequest, "validated", check)
    refusal = refused(body())
    assert (refusal.status, refusal.field) == (422, "guidance_scale")
    assert str(refusal) == "over the limit (and `prompt` is only mentioned here)"


def test_a_mask_refusal_names_the_mask_field_the_request_used(monkeypatch):
    def check(self, *args, **kwargs):
        raise InputError("`mask` must have the image's aspect ratio", field="mask")

    monkeypatch.setattr(FillRequest, "validated", check)
    wavespeed_body = body()
    wavespeed_body["mask_image"] = wavespeed_body.pop("mask")
    refusal = refused(wavespeed_body)
    assert refusal.field == "mask_image" and str(refusal).startswith("`mask_image` must")
    assert refused(body()).field == "mask"


def test_the_servers_own_refusals_name_their_field():
    cases = {
        "stepz": body(stepz=3),
        "output_format": body(output_format="gif"),
        "enhance_prompt": body(enhance_prompt=True),
        "enable_safety_checker": body(enable_safety_checker=True),
        "size": body(size="big"),
        "prompt": {"image": "x"},
    }
    assert {field: refused(request_body).field for field, request_body in cases.items()} == {
        field: field for field in cases
    }
    assert refused(body(image="x")).status == 400


def _url_options(tmp_path) -> ServerOptions:
    from fluxfill_engine.serve.lora_cache import LoraCache
    from fluxfill_engine.serve.urlguard import UrlPolicy

    return ServerOptions(url_policy=UrlPolicy(allow=True), lora_cache=LoraCache(tmp_path / "cache"))


def test_lora_urls_are_fetched_last_and_only_once_admitted(tmp_path):
    fetched: list[str] = []

    def fetcher(url, policy, field):
        fetched.append(url)
        return b"lora bytes"

    options = _url_options(tmp_path)
    lora = [{"path": "https://loras.example.com/style.safetensors", "scale": 0.5}]
    for bad in (body(loras=lora, num_inference_steps=0), body(loras=lora, output_format="gif")):
        with pytest.raises(RequestError):
            parse_task(bad, options, fetcher=fetcher)
    admitted: list[float] = []

    def full(spec):
        admitted.append(spec.cost)
        raise RuntimeError("the queue is full")

    with pytest.raises(RuntimeError, match="full"):
        parse_task(body(loras=lora), options, fetcher=fetcher, admit=full)
    assert fetched == [] and admitted == [256 * 256 / 1e6]  # body()'s image, one image
    spec = parse_task(body(loras=lora, num_images=3), options, fetcher=fetcher, admit=lambda spec: None)
    assert fetched == ["https://loras.example.com/style.safetensors"]
    (local,) = spec.public["lora_files"]
    assert local["scale"] == 0.5 and local["path"].startswith(str(tmp_path / "cache"))
    assert [str(lora.path) for lora in checked_loras(spec.request)] == [local["path"]]
    assert spec.cost == pytest.approx(3 * 256 * 256 / 1e6)


def test_requests_naming_urls_are_told_apart():
    from fluxfill_engine.serve.inputs import names_urls

    assert names_urls(body(image="https://a.example.com/x.png"))
    assert names_urls(body(mask_image=" http://a.example.com/m.png"))
    assert names_urls(body(loras=[{"path": "https://a.example.com/l.safetensors"}]))
    assert not names_urls(body()) and not names_urls(body(loras=[{"path": "local.safetensors"}]))


def test_a_waiting_task_keeps_only_what_its_batch_needs(tmp_path):
    from fluxfill_engine.serve.task_files import TaskFiles

    files = TaskFiles(tmp_path)
    for crop in (False, True):
        spec = parse_task(body(crop_to_mask=crop), ServerOptions())
        files.save_inputs("t", spec.request.image, spec.request.mask)
        waiting = spec.waiting(*files.input_headers("t"))
        assert waiting.request.image.size == spec.request.image.size
        with pytest.raises(ValueError, match="closed"):
            waiting.request.image.load()  # a size, no pixels
        assert (waiting.request.mask is spec.request.mask) == crop  # crop_to_mask: its box decides
        running = waiting.with_inputs(*files.load_inputs("t"))
        assert running.request.image.tobytes() == spec.request.image.tobytes()
