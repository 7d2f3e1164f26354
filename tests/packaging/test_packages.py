"""The wheel carries every package of the tree: pyproject's explicit package list names each folder of
``fluxfill_engine`` and ``fluxfill_kernels`` that is a package, and nothing that is not."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="the standard library reads TOML from Python 3.11")

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs = {"fluxfill_engine": ROOT / "fluxfill_engine", **setuptools["package-dir"]}
    found = set()
    for top, folder in package_dirs.items():
        folder = ROOT / folder
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            found.add(".".join((top, *relative.parts)))
    assert sorted(setuptools["packages"]) == sorted(found)
