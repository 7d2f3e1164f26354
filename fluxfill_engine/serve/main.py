"""Starting ``fluxfill serve``'s server from its checked arguments: the engine (in this process or as Ray
Serve replicas), the optional add-ons, the app, uvicorn. The flags and their checks are
:mod:`fluxfill_engine.cli.serve`; this module needs the serve extra."""

from __future__ import annotations

import argparse
from types import FrameType
from typing import Any

import uvicorn

from ..config import EngineConfig
from .allocator import return_large_blocks
from .app import ServerConfig, create_app
from .engines import EngineSpec, build_engine
from .inputs import ServerOptions
from .service import ServiceSettings
from .shutdown import GracefulShutdown
from .urlguard import UrlPolicy


def start_server(args: argparse.Namespace, device: str, dtype: str) -> None:
    """Build the app from the checked ``fluxfill serve`` arguments (:mod:`fluxfill_engine.cli.serve`),
    on ``device`` in ``dtype``, and run it with uvicorn until interrupted."""
    engine_config = EngineConfig.preset(args.preset, dtype=dtype)

    spec = EngineSpec(
        model=None if args.model is None else str(args.model.resolve()),
        base=None if args.base is None else str(args.base.resolve()),
        preset=args.preset,
        device=device,
        dtype=dtype,
        warmup_sizes=tuple(args.warmup) if args.ray else (),  # replicas warm up themselves
        memory_plan=getattr(args, "memory_plan", None),
    )

    def engine_factory() -> Any:
        if not args.ray:
            engine = build_engine(spec)
            # Where the start went (fluxfill_engine.startup); the warm-up follows, /healthz's `start` has it.
            print(f"fluxfill serve: {engine.start_report.line()}", flush=True)
            return engine
        from .ray_backend import deploy

        limits = {
            "max_input_megapixels": engine_config.max_input_megapixels,
            "max_loras": engine_config.max_loras,
        }
        return deploy(spec, args.replicas, args.ray_address, args.autoscale, **limits)

    addons: dict[str, Any] = {}
    if args.prompt_enhancer is not None:
        from .enhance import PromptEnhancer

        addons["enhancer"] = PromptEnhancer.from_folder(args.prompt_enhancer, device=device)
    if args.safety_checker is not None:
        from .safety import SafetyChecker

        addons["safety_checker"] = SafetyChecker.from_folder(args.safety_checker, device=device)
    config = ServerConfig(
        service=ServiceSettings(
            data_dir=args.data_dir,
            max_queue=args.max_queue,
            max_queue_megapixels=args.max_queue_megapixels,
            max_batch_images=args.max_batch,
            retention_hours=args.retention_hours,
            task_retention_days=args.task_retention_days,
            public_url=args.public_url.rstrip("/"),
            warmup_sizes=() if args.ray else args.warmup,
        ),
        options=ServerOptions(
            url_policy=UrlPolicy(allow=args.allow_url_inputs, trusted_networks=tuple(args.trusted_networks)),
            lora_dir=args.lora_dir,
            max_input_megapixels=engine_config.max_input_megapixels,
            max_loras=engine_config.max_loras,
            lora_cache_bytes=int(args.lora_cache_mb * 2**20),
        ),
        api_keys=tuple(args.api_keys),
        admin_keys=tuple(args.admin_keys),
        shutdown_grace_s=args.shutdown_grace_s,
        max_request_bytes=int(args.max_request_mb * 2**20),
        body_timeout_s=args.body_timeout_s,
        max_inflight_bytes=int(args.max_inflight_mb * 2**20),
        url_fetches=args.url_fetches,
        model=str(args.model) if args.model is not None else "tiny",
        preset=args.preset,
        device=device,
        tiny_model=args.model is None,
        webhook_secret=args.webhook_secret,
    )
    if args.model is None:
        print("No --model given: serving the built-in tiny random-weight model (its images are noise).")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_keys or args.admin_keys):
        print(f"warning: listening on {args.host} with no --api-key: anyone who reaches it can use it")
    print(f"fluxfill serve: http://{args.host}:{args.port}/ (data in {args.data_dir})", flush=True)
    return_large_blocks()  # large inputs' memory given back once freed (see .allocator)
    app = create_app(config, engine_factory, **addons)
    # uvicorn's own graceful stop waits on open connections without end: ours (the drain, then every
    # stream closed) comes first, uvicorn's timeout only backs it up.
    backstop = config.shutdown_grace_s + 15.0
    server = _DrainingServer(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=int(backstop)
        ),
        app.state.shutdown,
    )
    server.run()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, a SIGTERM or Ctrl-C also beginning the app's graceful stop
    (:class:`.shutdown.GracefulShutdown`)."""

    def __init__(self, config: uvicorn.Config, shutdown: GracefulShutdown) -> None:
        super().__init__(config)
        self.graceful = shutdown

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.graceful.begin()
        super().handle_exit(sig, frame)
