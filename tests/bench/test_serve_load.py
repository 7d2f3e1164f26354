"""The load-test tool against a real server whose queue overflows: every request is either accepted
or refused with 429, and every accepted task ends exactly once."""

from __future__ import annotations

import asyncio
import time

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
