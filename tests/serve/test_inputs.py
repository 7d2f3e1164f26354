"""Request bodies -> checked task specs (``serve.inputs``), without a server: the field of a refusal is
the one the failing check names in its error's ``field``, in the API's own spelling."""

from __future__ import annotations

import pytest

from fluxfill_engine import FillRequest
from fluxfill_engine.errors import InputError
from fluxfill_engine.serve.inputs import RequestError, ServerOptions, parse_task
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
