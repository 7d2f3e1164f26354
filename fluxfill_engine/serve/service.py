"""The task service: a bounded queue in front of one engine, its worker thread (one per replica),
cancel, restart recovery, outputs and retention, webhooks.

The HTTP layer (:mod:`.api`) only parses, calls this and renders; everything that must hold
whatever the transport lives here (which tasks run together is :mod:`.batching`, their files on disk
:mod:`.task_files`):

- every task ends with exactly one closing event (``task_postprocess_end``, ``task_error`` or
  ``task_cancel``), written in the same transaction as its final state;
- a failing task never stops the worker, and a batch that fails is retried task by task, so one
  bad request cannot fail its batch-mates;
- a restart finds every task: queued or running ones come back ``failed`` ("interrupted by restart"),
  or queued again when they carried an ``Idempotency-Key`` (their inputs are kept on disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import events as ev
from .batching import choose_batch
from .inputs import RequestError, TaskSpec, restore_task
from .metrics import ServeMetrics, allocated_gpu_bytes
from .store import (
    CANCELED,
    COMPLETED,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    DuplicateKey,
    Task,
    TaskStore,
)
from .task_files import TaskFiles, delete_expired
from .uploads import delete_expired_uploads
from .views import files_url, task_summary

if TYPE_CHECKING:
    from ..engine import Event, FillResult
    from .engines import ServingEngine

logger = logging.getLogger(__name__)


SHUT_DOWN = "canceled: the server shut down"


class QueueFull(Exception):
    """The queue holds ``max_queue`` tasks; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int, reason: str = "the queue is full") -> None:
        super().__init__(f"{reason}; retry after {retry_after} s")
        self.retry_after = retry_after


class NotFound(KeyError):
    """No task with this id (never created, or deleted after its retention)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id


class AlreadyFinished(Exception):
    """Cancel of a task that has finished (``status`` says how)."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(status)
        self.task_id = task_id
        self.status = status


class _Canceled(Exception):
    """Raised from the engine's event handler to stop a batch whose tasks were all canceled."""


class _ShuttingDown(Exception):
    """Raised from the engine's event handler when the server stops: the batch's tasks stay
    ``running`` in the store, and the next start recovers them as after a crash."""


@dataclass
class ServiceSettings:
    """The worker's knobs (``fluxfill serve`` flags)."""

    data_dir: Path
    max_queue: int = 64
    max_queue_megapixels: float = 1024.0  # the queued tasks' input megapixels x images, together
    max_batch_images: int = 4
    retention_hours: float = 24.0  # output files
    task_retention_days: float = 30.0  # the tasks themselves (their rows and events)
    public_url: str = ""  # the server's address as clients reach it: webhooks then carry absolute URLs
    warmup_sizes: Sequence[tuple[int, int]] = ()
    cleanup_every_s: float = 60.0  # how often the workers delete what retention expired, busy or idle


class TaskService:
    """Owns the queue, the worker thread and the engine; thread-safe.

    ``engine_factory`` builds the engine on the worker thread (so loading and warm-up happen after
    the HTTP server is up, and ``/healthz`` says ``warming`` meanwhile). ``hub`` is told of every
    task's news (default: a hub of its own, attached to no event loop).
    """

    def __init__(
        self,
        store: TaskStore,
        settings: ServiceSettings,
        engine_factory: Callable[[], ServingEngine],
        hub: ev.EventHub | None = None,
        enhancer: Any = None,
        safety_checker: Any = None,
        webhooks: Any = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.files = TaskFiles(settings.data_dir)
        self.hub = hub if hub is not None else ev.EventHub()
        self.metrics = ServeMetrics(
            queue_depth=self.queue_depth, gpu_memory=lambda: allocated_gpu_bytes(self.engine)
        )
        self.enhancer = enhancer
        self.safety_checker = safety_checker
        self.webhooks = webhooks
        self.engine: ServingEngine | None = None
        self.state = "warming"  # then "ready", or "failed" when the engine could not load
        self.load_error: str | None = None
        self.warmup: dict[str, float] = {}  # seconds per warm-up size
        self._next_cleanup = 0.0
        self._engine_factory = engine_factory
        self._queue: list[str] = []
        self._specs: dict[str, TaskSpec] = {}
        self._running: set[str] = set()
        self._busy_workers = 0  # workers running a pass
        self._cancel_requested: set[str] = set()
        self._changed = threading.Condition()
        self._stopping = False
        self._draining = False  # no new pass starts (a graceful stop: drain)
        self._seconds_per_image = 5.0  # running mean, for Retry-After
        self._threads = [threading.Thread(target=self._main, name="fluxfill-loader", daemon=True)]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._recover()
        self._threads[0].start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        for thread in list(self._threads):
            if thread.is_alive():
                thread.join(timeout)

    def drain(self, grace_s: float) -> None:
        """A graceful stop: no new pass starts; the running tasks get ``grace_s`` seconds to finish, then
        are canceled (their closing event ``task_cancel``, error :data:`SHUT_DOWN`) and their pass stops
        at its next step. Queued tasks stay queued in the store for the next start."""
        deadline = time.monotonic() + grace_s
        with self._changed:
            self._draining = True
            self._changed.notify_all()
            while self._running and time.monotonic() < deadline:
                self._changed.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            running = list(self._running)
            self._cancel_requested.update(running)
        for task_id in running:
            self._finish(task_id, CANCELED, ev.TASK_CANCEL, {"error": SHUT_DOWN}, error=SHUT_DOWN)

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` has begun."""
        return self._draining

    def queue_depth(self) -> int:
        with self._changed:
            return len(self._queue)

    def running(self) -> int:
        with self._changed:
            return len(self._running)

    def _recover(self) -> None:
        """Tasks the last process left queued or running: queued again (with an idempotency key and
        their inputs on disk) or failed."""
        for task in self.store.by_status(QUEUED, RUNNING):
            spec = self._restored_spec(task) if task.idempotency_key else None
            if spec is None:
                self._finish(task.id, FAILED, ev.TASK_ERROR, {"error": INTERRUPTED}, error=INTERRUPTED)
                continue
            with self._changed:
                self._queue.append(task.id)
                self._specs[task.id] = spec.waiting(*self.files.input_headers(task.id))
                position = len(self._queue)
            self.store.update(
                task.id,
                (ev.TASK_QUEUE, {"position": position, "requeued": "restart"}),
                status=QUEUED,
                started_at=None,
                progress_step=0,
            )

    def _restored_spec(self, task: Task) -> TaskSpec | None:
        try:
            return restore_task(task.request, *self.files.load_inputs(task.id))
        except (OSError, ValueError, TypeError) as err:
            logger.warning("task %s cannot run again after the restart: %s", task.id, err)
            return None

    # ---------------------------------------------------------------- requests

    def get(self, task_id: str) -> Task:
        task = self.store.get(task_id)
        if task is None:
            raise NotFound(task_id)
        return task

    def submit(
        self, spec: TaskSpec, api: str, idempotency_key: str | None = None, owner: str = ""
    ) -> tuple[Task, bool]:
        """Queue a checked task for ``owner`` (a hash of its API key); returns it and whether it is new
        (False: that owner's task of the idempotency key).

        Raises :class:`QueueFull`."""
        if idempotency_key is not None:
            existing = self.store.by_key(idempotency_key, owner)
            if existing is not None:
                return existing, False
        self._check_room(spec.cost)
        task = Task(
            id=uuid.uuid4().hex,
            status=QUEUED,
            api=api,
            created_at=time.time(),
            request=spec.public,
            idempotency_key=idempotency_key,
            seed=spec.request.seed,
            owner=owner,
        )
        self.files.save_inputs(task.id, spec.request.image, spec.request.mask)
        with self._changed:
            try:
                self._check_room(spec.cost)
                self.store.create(task, (ev.TASK_QUEUE, {"position": len(self._queue) + 1}))
            except (DuplicateKey, QueueFull) as err:
                self.files.delete_inputs(task.id)
                if isinstance(err, QueueFull):
                    raise
                return err.task, False
            self.store.update(task.id, seed=spec.request.seed)
            self._queue.append(task.id)
            self._specs[task.id] = spec.waiting(*self.files.input_headers(task.id))  # no pixels held
            self._changed.notify_all()
        self.hub.notify(task.id)
        return self.get(task.id), True

    def admit(self, spec: TaskSpec) -> None:
        """Raise what :meth:`submit` would for ``spec`` now (the queue full, the task too costly), so a
        request can be refused before work that only a queued task needs (downloads)."""
        self._check_room(spec.cost)

    def _check_room(self, cost: float = 0.0) -> None:
        limit = self.settings.max_queue_megapixels
        if cost > limit:
            raise RequestError(
                f"the task weighs {cost:g} megapixels x images, over the queue's limit of {limit:g} "
                "(--max-queue-megapixels): send a smaller image or fewer num_images",
                413,
                "num_images",
            )
        with self._changed:
            depth = len(self._queue)
            queued = sum(spec.cost for spec in self._specs.values())
        # The time the queue ahead takes at the measured seconds per image (batching only helps).
        retry_after = max(1, round(depth * self._seconds_per_image / self.replicas))
        if depth >= self.settings.max_queue:
            raise QueueFull(retry_after)
        if queued + cost > limit:
            raise QueueFull(
                retry_after,
                f"the queue holds {queued:g} of its {limit:g} megapixels x images (--max-queue-megapixels)",
            )

    def cancel(self, task_id: str) -> Task:
        """Cancel a queued task now, or a running one at its next step. Raises :class:`NotFound`,
        :class:`AlreadyFinished`."""
        task = self.get(task_id)
        with self._changed:
            if task_id in self._queue:
                self._queue.remove(task_id)
                self._specs.pop(task_id, None)
                queued = True
            else:
                queued = False
                if task_id in self._running:
                    self._cancel_requested.add(task_id)
        if queued:
            self._finish(task_id, CANCELED, ev.TASK_CANCEL, {"error": "canceled"}, error="canceled")
            return self.get(task_id)
        if task.finished:
            raise AlreadyFinished(task_id, task.status)
        return self.get(task_id)

    def cancel_requested(self, task_id: str) -> bool:
        with self._changed:
            return task_id in self._cancel_requested

    # ---------------------------------------------------------------- worker

    @property
    def replicas(self) -> int:
        """Engines serving tasks at once: 1, or the replica count of a scaled-out engine."""
        return int(getattr(self.engine, "replicas", 1))

    def _main(self) -> None:
        """Load the engine, warm it up, then work; a scaled-out engine (``engine.replicas`` > 1,
        e.g. Ray Serve replicas) gets one worker thread per replica."""
        try:
            self.engine = engine = self._engine_factory()
            if self.settings.warmup_sizes:
                self.warmup = engine.warmup(self.settings.warmup_sizes)["seconds"]
        except Exception as err:
            logger.exception("the engine failed to load")
            self.load_error = f"{type(err).__name__}: {err}"
            self.state = "failed"
            return
        self.state = "ready"
        for index in range(1, self.replicas):
            thread = threading.Thread(target=self._work, name=f"fluxfill-worker-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        self._work()

    def _work(self) -> None:
        while True:
            with self._changed:  # one worker at a time cleans up
                cleanup = time.time() >= self._next_cleanup
                if cleanup:
                    self._next_cleanup = time.time() + self.settings.cleanup_every_s
            if cleanup:
                self.delete_expired()
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:  # nothing queued for a while: back to the clean-up check
                continue
            try:
                self._run_batch(batch)
            except Exception:  # never lets a task stop the worker
                logger.exception("unexpected error running tasks %s", batch)
                for task_id in batch:
                    message = "internal error (see the server log)"
                    self._finish(task_id, FAILED, ev.TASK_ERROR, {"error": message}, error=message)
            finally:
                with self._changed:
                    self._busy_workers -= 1
                    self._running.difference_update(batch)
                    self._cancel_requested.difference_update(batch)
                    self._changed.notify_all()  # drain() waits for the running tasks

    def _next_batch(self) -> list[str] | None:
        """This worker's next batch (:func:`.batching.choose_batch`), taken off the queue; ``[]`` when
        nothing was queued within ``cleanup_every_s``; ``None`` when the service stops."""
        with self._changed:
            if not self._queue and not self._stopping and not self._draining:
                self._changed.wait(timeout=self.settings.cleanup_every_s)
            if self._stopping or self._draining:
                return None
            if not self._queue:
                return []
            idle = max(1, self.replicas - self._busy_workers)
            batch = choose_batch(self._queue, self._specs, self.engine, self.settings.max_batch_images, idle)
            for task_id in batch:
                self._queue.remove(task_id)
            self._running.update(batch)
            self._busy_workers += 1
            return batch

    def _run_batch(self, batch: list[str]) -> None:
        with self._changed:
            waiting = [self._specs.pop(task_id) for task_id in batch]
        # Decoded now, not while they waited (a queue of large inputs holds files, not pixels).
        specs = [
            spec.with_inputs(*self.files.load_inputs(task_id))
            for task_id, spec in zip(batch, waiting, strict=True)
        ]
        now = time.time()
        for task_id in batch:
            self.store.update(
                task_id, (ev.TASK_ACCEPT, {"batch_size": len(batch)}), status=RUNNING, started_at=now
            )
            self.hub.notify(task_id)
        self.metrics.batch_size.observe(len(batch))
        results = self._run_engine(batch, specs)
        if results is None and len(batch) > 1 and not self._stopping:
            for task_id, spec in zip(batch, specs, strict=True):  # one bad request fails only itself
                if not self.get(task_id).finished:
                    self._finish_results([task_id], [spec], self._run_engine([task_id], [spec], retry=True))
            return
        self._finish_results(batch, specs, results)

    def _emit(
        self, batch: Sequence[str], name: str, data: dict[str, Any] | None = None, **fields: Any
    ) -> None:
        for task_id in batch:
            if not self.cancel_requested(task_id):
                self.store.update(task_id, (name, data or {}), **fields)
                self.hub.notify(task_id)

    def _run_engine(
        self, batch: list[str], specs: list[TaskSpec], retry: bool = False
    ) -> list[FillResult] | None:
        """Run tasks as one engine pass; None when it failed (each task then failed, or is retried
        alone when ``batch`` had several)."""
        self._emit(batch, ev.TASK_PREPROCESS_START, {"retry_alone": True} if retry else {})
        started: dict[str, float] = {}

        def on_event(event: Event) -> None:
            if event.type in ("error", "done"):  # closing events: the pass is over either way
                return
            if self._stopping:
                raise _ShuttingDown()
            self._cancel_now(batch)
            if event.type == "preprocess_end":
                self._emit(batch, ev.TASK_PREPROCESS_END)
                total = specs[0].request.num_inference_steps
                self._emit(batch, ev.TASK_START, {"total": total}, progress_total=total)
                started["denoise"] = time.perf_counter()
            elif event.type == "step" and event.step and event.total:
                step, total = event.step, event.total
                elapsed = time.perf_counter() - started.get("denoise", time.perf_counter())
                eta = elapsed / step * (total - step)
                data = {"step": step, "total": total, "eta_seconds": round(eta, 3)}
                self._emit(batch, ev.TASK_OUTPUT, data, progress_step=step, progress_total=total)

        try:
            requests = [self._enhanced(task_id, spec) for task_id, spec in zip(batch, specs, strict=True)]
            assert self.engine is not None
            if len(requests) == 1:
                return [self.engine.run(requests[0], on_event=on_event)]
            return self.engine.run_batch(requests, on_event=on_event)
        except (_Canceled, _ShuttingDown):
            return []
        except Exception as err:
            if len(batch) > 1:
                logger.warning("batch %s failed (%s); running its tasks one by one", batch, err)
                return None
            self._cancel_now(batch, raise_when_all=False)
            message = _error_message(err)
            self._finish(batch[0], FAILED, ev.TASK_ERROR, {"error": message}, error=message)
            return []

    def _enhanced(self, task_id: str, spec: TaskSpec) -> Any:
        """The request with its prompt rewritten when it asked; the new prompt is kept in the task."""
        if not spec.enhance_prompt:
            return spec.request
        prompt = self.enhancer.enhance(spec.request.prompt)
        spec.public["enhanced_prompt"] = prompt
        self.store.update(task_id, request=spec.public)
        return dataclasses.replace(spec.request, prompt=prompt)

    def _cancel_now(self, batch: Sequence[str], raise_when_all: bool = True) -> None:
        """Close the tasks of ``batch`` whose cancel was asked; stop the pass when none is left."""
        with self._changed:
            asked = [task_id for task_id in batch if task_id in self._cancel_requested]
        for task_id in asked:
            self._finish(task_id, CANCELED, ev.TASK_CANCEL, {"error": "canceled"}, error="canceled")
        if raise_when_all and asked and len(asked) == len(batch):
            raise _Canceled()

    def _finish_results(
        self, batch: list[str], specs: list[TaskSpec], results: list[FillResult] | None
    ) -> None:
        if not results:
            return
        for task_id, spec, result in zip(batch, specs, results, strict=True):
            if self.cancel_requested(task_id) or self.get(task_id).finished:
                self._cancel_now([task_id], raise_when_all=False)
                continue
            timings = {name: round(seconds, 4) for name, seconds in result.timings.items()}
            end = {"timings": timings}
            if "replica" in result.stats:  # which engine replica ran it (scale-out)
                end["replica"] = result.stats["replica"]
            self._emit([task_id], ev.TASK_END, end, timings=timings)
            self._emit([task_id], ev.TASK_POSTPROCESS_START)
            images, nsfw = result.images, []  # no flags where no check ran: [False] would claim one
            if spec.safety_checker:
                images, nsfw = self.safety_checker.check(images)
            names = self.files.save_outputs(task_id, images, spec.output_format)
            for stage, seconds in result.timings.items():
                self.metrics.stage.labels(stage).observe(seconds)
            per_image = result.timings.get("total", 0.0) / max(len(images), 1)
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * per_image
            data = {"outputs": [files_url(task_id, name) for name in names], "has_nsfw_contents": nsfw}
            self._finish(
                task_id,
                COMPLETED,
                ev.TASK_POSTPROCESS_END,
                data,
                outputs=names,
                nsfw=nsfw,
                seed=result.seed,
                progress_step=spec.request.num_inference_steps,
            )

    def _finish(self, task_id: str, status: str, event: str, data: dict[str, Any], **fields: Any) -> None:
        """Close a task (once: a second close, e.g. a cancel racing the end, is ignored)."""
        finished_at = time.time()
        closed = self.store.finish_if_unfinished(
            task_id, (event, data), status=status, finished_at=finished_at, **fields
        )
        if not closed:
            return
        self.hub.notify(task_id)
        self.files.delete_inputs(task_id)
        task = self.store.get(task_id)
        if task is None:  # another worker's clean-up deleted it already (a retention shorter than a pass)
            return
        self.metrics.tasks.labels(status).inc()
        self.metrics.latency.observe(finished_at - task.created_at)
        webhook = task.request.get("webhook")
        if webhook and self.webhooks is not None:
            kind = "task.completed" if status == COMPLETED else f"task.{status}"
            self.webhooks.send(webhook, kind, task_summary(task, self.settings.public_url))

    def delete_expired(self) -> None:
        """Delete what retention expired (:func:`.task_files.delete_expired`); the workers call it every
        ``cleanup_every_s``, busy or idle."""
        settings = self.settings
        delete_expired(self.store, self.files, settings.retention_hours, settings.task_retention_days)
        delete_expired_uploads(settings.data_dir / "uploads", settings.retention_hours)  # kept as outputs are


def _error_message(err: BaseException) -> str:
    if isinstance(err, (ValueError, TypeError, FileNotFoundError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def running_service(service: TaskService) -> Any:
    """Start ``service`` for the block, stop it after."""
    service.start()
    try:
        yield service
    finally:
        service.stop()
