"""``fluxfill inpaint --out``: an output that cannot be written is refused before any work, and the
check leaves nothing behind."""

import pytest

from fluxfill_engine.cli import main
from fluxfill_engine.cli.output import check_output


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as building a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr("fluxfill_engine.testing.demo.tiny_engine", refuse)
    monkeypatch.setattr("fluxfill_engine.engine.FluxFillEngine.from_pretrained", refuse)


def test_an_output_folder_that_cannot_be_created_is_refused_before_the_model_loads(capsys, no_model):
    # /proc refuses new folders even to root, for whom the permission bits say yes.
    assert main(["inpaint", "--steps", "100", "--out", "/proc/nope/o.png"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --out: '/proc/nope/o.png' cannot be written")


def test_an_output_file_that_cannot_be_written_is_refused(capsys, no_model):
    assert main(["inpaint", "--out", "/proc/version.png"]) == 2
    assert capsys.readouterr().err.startswith("error: --out: '/proc/version.png' cannot be written")


def test_the_check_leaves_no_folder_and_no_file_behind(tmp_path):
    out = tmp_path / "new" / "deeper" / "o.png"
    assert check_output(out, 2) == [out.with_name("o-0.png"), out.with_name("o-1.png")]
    assert list(tmp_path.iterdir()) == []


def test_the_check_keeps_an_existing_output_as_it_is(tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"an earlier picture")
    assert check_output(out, 1) == [out]
    assert out.read_bytes() == b"an earlier picture" and list(tmp_path.iterdir()) == [out]


def test_a_refused_run_leaves_the_folders_it_checked_uncreated(tmp_path, capsys, no_model):
    out = tmp_path / "new" / "o.png"
    assert main(["inpaint", "--out", str(out), "--device", "bogus"]) == 2
    assert capsys.readouterr().err.startswith("error: --device:")
    assert not (tmp_path / "new").exists()
