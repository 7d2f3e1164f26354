"""``fluxfill bench batch`` (one by one vs batches), on the tiny model: fast."""

import json

import pytest

from fluxfill_engine.bench.batch_bench import ONE_BY_ONE
from fluxfill_engine.cli import main


@pytest.mark.slow
def test_batch_bench_writes_its_record(tmp_path, capsys):
    out = tmp_path / "batch.json"
    argv = [
        "bench",
        "batch",
        "--preset",
        "cpu-tiny",
        "--steps",
        "1",
        "--requests",
        "4",
        "--batch-sizes",
        "1,2,4",
    ]
    assert main([*argv, "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["schema"] == "fluxfill-batch-bench/1" and record["settings"]["size"] == 256
    modes = record["modes"]
    assert list(modes) == [ONE_BY_ONE, "batches of 1", "batches of 2", "batches of 4"]
    assert [row["calls"] for row in modes.values()] == [4, 4, 2, 1]
    assert [row["batch_size"] for row in modes.values()] == [1, 1, 2, 4]
    assert modes[ONE_BY_ONE]["speedup"] == 1.0
    for row in modes.values():
        assert row["images_per_s"]["median"] > 0 and row["ms_per_step_per_pass"]["median"] > 0
        # Batched images are the one-by-one images (8-bit rounding of ~1e-6 apart at most).
        assert row["vs_one_by_one"]["max_levels"] <= 1 and row["vs_one_by_one"]["share_differing"] < 1e-3
    assert modes["batches of 1"]["vs_one_by_one"]["max_levels"] == 0  # a batch of one is the solo path
    report = out.with_suffix(".md").read_text()
    assert report.startswith("# Batching: 4 requests") and "CPU only" in report
    # The record names the command that reproduces it (the defaults left out).
    assert "fluxfill bench batch --steps 1 --requests 4 --batch-sizes 1,2,4 --repeats 1 --out" in report
    assert record["command"].endswith(str(out)) and "batches of 4" in capsys.readouterr().out


def test_batch_bench_refuses_what_it_cannot_measure(capsys):
    assert main(["bench", "batch", "--requests", "2", "--batch-sizes", "1,4"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
