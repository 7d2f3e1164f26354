"""The load-test tool against a real server whose queue overflows: every request is either accepted
or refused with 429, and every accepted task ends exactly once."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from fluxfill_engine import EngineConfig
from fluxfill_engine.bench.serve_load import Outcome, run_load, summarize
from fluxfill_engine.testing.demo import tiny_engine
from tests.support.serve import SlowSteps, make_app, server_in_thread


def test_open_loop_load_with_a_full_queue(tmp_path):
    engine = SlowSteps(tiny_engine(EngineConfig.preset("reference", dtype="float32")), 0.02)
    with server_in_thread(make_app(tmp_path, engine, max_queue=3)) as base:
        start = time.perf_counter()
        outcomes = asyncio.run(run_load(base, requests=24, rate=60.0))
        summary = summarize(outcomes, time.perf_counter() - start)
    assert summary["accepted"] + summary["rejected_429"] == 24 and summary["other_status"] == []
    assert summary["rejected_429"] > 0 and summary["completed"] == summary["accepted"]
    assert summary["every_accepted_task_ended_once"], summary["not_ended_once"]
    assert summary["latency_p50_s"] <= summary["latency_p99_s"]


def test_summary_flags_a_task_that_did_not_end_once():
    twice = Outcome(0, 0.0, 201, "a", ["task_postprocess_end", "task_error"], "completed", 1.0)
    never = Outcome(1, 0.0, 201, "b", [], "running")
    fine = Outcome(2, 0.0, 201, "c", ["task_postprocess_end"], "completed", 2.0)
    summary = summarize([twice, never, fine], 1.0)
    assert not summary["every_accepted_task_ended_once"] and summary["not_ended_once"] == [0, 1]


def test_refused_unread_uploads_against_a_keyed_server(tmp_path):
    from fluxfill_engine.bench.serve_load import refused_unread_uploads
    from tests.support.serve import InstantEngine

    with server_in_thread(make_app(tmp_path, InstantEngine(), api_keys=("k",))) as base:
        figures = refused_unread_uploads(base, os.getpid(), uploads=3, declared_mb=20.0)
    assert figures["answers"] == ["401"] and figures["answered_401"] == 3
    assert figures["client_sent_mib_max"] < 20.0 and figures["answer_max_s"] < 10
    assert figures["server_rss_before_mib"] <= figures["server_rss_peak_mib"]


def test_large_input_queue_reports_what_the_queue_took(tmp_path):
    from fluxfill_engine.bench.serve_load import hostile_markdown, large_input_queue
    from tests.support.serve import InstantEngine

    app = make_app(tmp_path, InstantEngine(), max_queue_megapixels=5.0)
    with server_in_thread(app) as base:
        queue = large_input_queue(base, None, side=1024, num_images=2, submissions=4)
    assert queue["submissions"] == 4 and len(queue["answers"]) == 4
    assert set(queue["answers"]) <= {201, 429}  # 2.1 megapixels x images each: two fit at most
    assert queue["accepted"] == queue["answers"].count(201) >= 1
    assert all("--max-queue-megapixels" in message for message in queue["refusals"])
    memory = {f"server_rss_{when}_mib": 100.0 for when in ("before", "peak", "after", "queued")}
    unread = {
        "uploads": 2,
        "declared_mib_each": 1.0,
        "answers": ["401"],
        "answered_401": 2,
        "answer_p50_s": 0.01,
        "answer_max_s": 0.02,
        "client_sent_mib_max": 0.1,
        **memory,
    }
    keyed = {"answers": ["400", "503"], "answer_max_s": 1.0, **memory}
    queued = {**queue, **memory}
    record = {
        "unauthenticated_uploads": unread,
        "authenticated_uploads": keyed,
        "large_input_queue": queued,
        "large_input_queue_4096": queued,
        "sigterm_to_exit": {
            "grace_s": 5.0,
            "sigterm_to_exit_s": 5.5,
            "stream_last_event": "task_cancel",
            "sync_answer": "200 created",
        },
        "server": {"model": "tiny", "device": "cpu"},
        "flags": "",
        "command": "fluxfill bench serve-load --hostile",
        "machine": "test",
    }
    page = hostile_markdown(record)
    assert "2 unauthenticated uploads of 1 MiB" in page and "1x 400, 1x 503" in page
    assert "| SIGTERM to exit with clients connected (--shutdown-grace-s 5;" in page
    assert "| 5.50 s; the stream's last event: task_cancel; the sync request: 200 created |" in page


@pytest.mark.slow
def test_sigterm_to_exit_against_a_spawned_server_with_a_grace():
    """The ``--hostile`` SIGTERM case as ``run_hostile`` runs it: a spawned tiny-model server exits
    within its grace (plus the cancel's time), the running task's stream closing with its cancel."""
    from fluxfill_engine.bench.serve_load import _spawned, sigterm_to_exit

    grace = 1.0
    with _spawned(["--shutdown-grace-s", str(grace)]) as (url, process, _):
        figures = sigterm_to_exit(url, process, grace)
        assert process.returncode is not None
    assert figures["grace_s"] == grace and grace <= figures["sigterm_to_exit_s"] < grace + 30
    assert figures["stream_last_event"] == "task_cancel"
    assert figures["sync_answer"].split()[0].isdigit()  # answered, not cut off
