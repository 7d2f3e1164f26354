"""Which queued tasks run together (``serve.batching``), on plain stand-ins for specs and an engine."""

from __future__ import annotations

from types import SimpleNamespace

from fluxfill_engine.serve.batching import batch_key, batch_share, choose_batch


class KeyedEngine:
    """Requests fit together when their steps are equal."""

    def batch_key(self, request):
        return request.steps


def _spec(steps: int = 2, images: int = 1, enhance: bool = False, safety: bool = False):
    request = SimpleNamespace(steps=steps, num_images=images)
    return SimpleNamespace(request=request, enhance_prompt=enhance, safety_checker=safety)


def test_batch_share_splits_a_backlog_evenly() -> None:
    assert [batch_share(8, 2), batch_share(3, 2), batch_share(1, 4), batch_share(5, 1)] == [4, 2, 1, 5]
    assert batch_share(3, 0) == 3  # the worker asking is idle itself


def test_the_oldest_task_and_those_that_fit_with_it_in_queue_order():
    specs = {"a": _spec(2), "b": _spec(3), "c": _spec(2), "d": _spec(2)}
    assert choose_batch(["a", "b", "c", "d"], specs, KeyedEngine(), max_images=8) == ["a", "c", "d"]
    assert choose_batch(["b", "a", "c"], specs, KeyedEngine(), max_images=8) == ["b"]


def test_the_image_limit_skips_a_task_too_big_but_not_the_smaller_ones_after_it():
    specs = {"a": _spec(images=2), "big": _spec(images=3), "small": _spec(images=2)}
    assert choose_batch(["a", "big", "small"], specs, KeyedEngine(), max_images=4) == ["a", "small"]
    assert choose_batch(["a", "big", "small"], specs, KeyedEngine(), max_images=1) == ["a"]  # the oldest runs


def test_what_runs_alone():
    specs = {"a": _spec(), "rewrite": _spec(enhance=True), "checked": _spec(safety=True), "b": _spec()}
    queue = ["a", "rewrite", "checked", "b"]
    assert choose_batch(queue, specs, KeyedEngine(), max_images=8) == ["a", "b"]  # not with another check
    assert choose_batch(["rewrite", "a"], specs, KeyedEngine(), max_images=8) == ["rewrite"]  # prompt unknown
    assert choose_batch(["a", "b"], specs, object(), max_images=8) == ["a"]  # an engine without batch_key
    assert batch_key(object(), specs["a"]) is None and batch_key(KeyedEngine(), specs["rewrite"]) is None
    assert batch_key(KeyedEngine(), specs["checked"]) != batch_key(KeyedEngine(), specs["a"])


def test_an_idle_worker_takes_its_share():
    specs = {name: _spec() for name in "abcde"}
    assert choose_batch(list("abcde"), specs, KeyedEngine(), max_images=8, idle_workers=2) == ["a", "b", "c"]
    assert choose_batch(list("de"), specs, KeyedEngine(), max_images=8, idle_workers=2) == ["d"]
