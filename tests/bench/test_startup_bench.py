"""``fluxfill bench startup``: the verb renders a record's markdown again (``--render``), naming the verb
that produced it. (Measuring starts a mid model twice per kind, minutes on a CPU: not a unit test.)"""

import json
import shutil
from pathlib import Path

from fluxfill_engine.cli import main

RECORD = Path(__file__).parents[2] / "benchmarks" / "results" / "startup-cpu-mid.json"


def test_render_writes_the_table_of_both_starts_from_the_record(tmp_path):
    out = tmp_path / "startup"
    shutil.copy(RECORD, out.with_suffix(".json"))
    assert main(["bench", "startup", "--render", "--out", str(out)]) == 0
    record = json.loads(RECORD.read_text())
    text = out.with_suffix(".md").read_text()
    assert f"**Saved engine: {record['ratio_start_to_first_image']}x faster" in text
    saved = record["summary"]["saved"]["start_to_first_image_seconds"]
    assert "| saved engine |" in text and f"| {saved:.2f} |" in text
    assert "Produced by `fluxfill bench startup " in text
