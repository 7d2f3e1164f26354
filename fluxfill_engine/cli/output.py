"""The files ``fluxfill inpaint --out`` names, and the check that they can be written, made before any
work so a run never ends in an output it cannot save."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def output_paths(out: Path, count: int) -> list[Path]:
    """``out`` for one image; ``out-0``, ``out-1``, ... (same folder and extension) for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def check_output(out: Path, count: int) -> list[Path]:
    """The files ``--out`` names for ``count`` images, each checked: a known image extension, not a
    folder, and writable, found by really writing, since permission bits say yes to root even on a
    read-only or virtual file system. Raises ``ValueError`` naming ``--out``."""
    import PIL.Image

    writable = {ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.SAVE}
    if out.suffix.lower() not in writable:
        what = f"extension {out.suffix!r}" if out.suffix else "no extension"
        raise ValueError(
            f"--out: {str(out)!r} has {what}; use an image extension such as .png, .jpg or .webp"
        )
    paths = output_paths(out, count)
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--out: {str(path)!r} is a folder; give a file name such as out.png")
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"--out: {str(existing)!r} is a file, so {str(path)!r} cannot be written")
        try:
            _try_writing(path)
        except OSError as err:
            reason = err.strerror or str(err)
            raise ValueError(f"--out: {str(path)!r} cannot be written: {reason}") from None
    return paths


def _try_writing(path: Path) -> None:
    """Write where ``path`` will be written, leaving nothing behind: the missing folders are made and
    removed again, a probe file is created and deleted beside it, an existing file is opened for
    appending (its contents untouched)."""
    made: list[Path] = []
    folder = path.parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    try:
        for missing in reversed(made):
            missing.mkdir()
        if path.exists():
            with path.open("ab"):
                pass
        else:
            handle, probe = tempfile.mkstemp(dir=path.parent, prefix=".fluxfill-probe-", suffix=path.suffix)
            os.close(handle)
            os.unlink(probe)
    finally:
        for created in made:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()
