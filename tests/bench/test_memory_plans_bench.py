"""``fluxfill bench memory-plans``: every placement runs and gives the resident images."""

import json

import pytest

from fluxfill_engine.bench import memory_plans
from fluxfill_engine.cli import main


@pytest.mark.slow
def test_every_placement_runs_and_equals_the_resident_run(tmp_path):
    out = tmp_path / "plans.json"
    argv = ["--preset", "cpu-tiny", "--size", "256", "--steps", "1", "--repeats", "1", "--out", str(out)]
    assert main(["bench", "memory-plans", *argv]) == 0
    record = json.loads(out.read_text())
    assert set(record["placements"]) == set(memory_plans.PLACEMENTS)
    assert all(entry["equal_to_resident"] for entry in record["placements"].values())
    assert record["placements"]["resident"]["vs_resident"] == 1.0
    table = out.with_suffix(".md").read_text()
    assert table.count("| yes |") == len(memory_plans.PLACEMENTS)
    assert "Produced by `fluxfill bench memory-plans --preset cpu-tiny " in table
