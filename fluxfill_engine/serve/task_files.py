"""A task's files under the server's data folder, and how long they are kept.

- ``inputs/ID/image.png`` (and ``mask.png``): the checked input images, kept while the task waits or
  runs, so that a task with an ``Idempotency-Key`` can run again after a restart; deleted when it ends.
  A waiting task holds only their headers in memory; they are decoded when it runs.
- ``files/ID/N.EXT``: the output images, served at ``/v1/files/ID/N.EXT`` for ``retention_hours`` after
  the task finished (then deleted, the task marked ``files_deleted``); the task itself, its row and
  events, is deleted after ``task_retention_days``.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image

    from .store import TaskStore

OUTPUT_FORMATS = ("png", "jpeg", "webp")  # as requests name them; PIL's names are these in capitals


class TaskFiles:
    """The input and output files of the tasks of one data folder."""

    def __init__(self, data_dir: Path) -> None:
        self.inputs_dir = data_dir / "inputs"
        self.outputs_dir = data_dir / "files"

    def save_inputs(self, task_id: str, image: PIL.Image.Image, mask: PIL.Image.Image | None) -> None:
        folder = self.inputs_dir / task_id
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / "image.png")
        if mask is not None:
            mask.save(folder / "mask.png")

    def load_inputs(self, task_id: str) -> tuple[PIL.Image.Image, PIL.Image.Image | None]:
        """The saved image and mask of a task. Raises ``OSError`` (missing) or ``ValueError`` (unreadable)."""
        from ..images import open_image_bytes

        folder = self.inputs_dir / task_id
        image = open_image_bytes((folder / "image.png").read_bytes(), "image")
        mask_file = folder / "mask.png"
        mask = open_image_bytes(mask_file.read_bytes(), "mask") if mask_file.exists() else None
        return image, mask

    def input_headers(self, task_id: str) -> tuple[PIL.Image.Image, PIL.Image.Image | None]:
        """Stand-ins for a task's saved image and mask while it waits: their size and mode read from the
        files' headers, no pixels (any pixel access raises ``ValueError``); :meth:`load_inputs` decodes
        them when the task runs."""
        import PIL.Image

        def header(path: Path) -> PIL.Image.Image:
            stand_in = PIL.Image.open(path)
            stand_in.close()  # the file closed, the size kept; pixels raise "Operation on closed image"
            return stand_in

        folder = self.inputs_dir / task_id
        mask_file = folder / "mask.png"
        return header(folder / "image.png"), header(mask_file) if mask_file.exists() else None

    def delete_inputs(self, task_id: str) -> None:
        shutil.rmtree(self.inputs_dir / task_id, ignore_errors=True)

    def save_outputs(self, task_id: str, images: Sequence[PIL.Image.Image], output_format: str) -> list[str]:
        """Write a task's output images as ``0.EXT``, ``1.EXT``, ...; returns their names."""
        folder = self.outputs_dir / task_id
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for index, image in enumerate(images):
            name = f"{index}.{output_format}"
            buffer = io.BytesIO()
            picture = image.convert("RGB") if output_format == "jpeg" else image
            picture.save(buffer, output_format.upper())
            (folder / name).write_bytes(buffer.getvalue())
            names.append(name)
        return names

    def output(self, task_id: str, name: str) -> Path:
        """Where an output file named by the task's ``outputs`` is."""
        return self.outputs_dir / task_id / name

    def delete_outputs(self, task_id: str) -> None:
        shutil.rmtree(self.outputs_dir / task_id, ignore_errors=True)


def delete_expired(
    store: TaskStore,
    files: TaskFiles,
    retention_hours: float,
    task_retention_days: float,
    now: float | None = None,
) -> None:
    """Delete the output files of tasks finished more than ``retention_hours`` ago (the tasks stay, with
    ``files_deleted``), and the tasks finished more than ``task_retention_days`` ago with their events
    and files (then unknown: 404)."""
    now = time.time() if now is None else now
    for task_id in store.forget(now - task_retention_days * 86400):
        files.delete_outputs(task_id)
        files.delete_inputs(task_id)
    for task in store.expired(now - retention_hours * 3600):
        files.delete_outputs(task.id)
        store.update(task.id, files_deleted=1)
