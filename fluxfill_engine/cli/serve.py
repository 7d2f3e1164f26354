"""``fluxfill serve``: its flags, checked before anything loads; the server itself starts in
:mod:`fluxfill_engine.serve.main`."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Any

from .model_args import add_model_arguments, check_model_paths, resolve_model_arguments

DEFAULT_PORT = 8000


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--warmup takes WIDTHxHEIGHT sizes such as 1024x1024, got {text!r}"
        ) from None
    return width, height


def _sizes(text: str) -> list[tuple[int, int]]:
    return [_size(part) for part in text.split(",") if part.strip()]


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--url-allow-network takes a CIDR such as 10.0.5.0/24, got {text!r}"
        ) from None


def _autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--autoscale takes MIN,MAX replicas such as 1,4, got {text!r}"
        ) from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def add_serve_parser(commands: Any) -> None:
    """The ``serve`` subcommand of ``fluxfill``."""
    serve = commands.add_parser(
        "serve",
        help="run the FLUX Fill HTTP API (WaveSpeed-compatible + native) with a playground page",
        description="Serve FLUX.1 Fill over HTTP: tasks with progress events (SSE, WebSocket), files, "
        "a WaveSpeed-compatible endpoint and a playground page at /. API: docs/serving.md.",
    )
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=Path("fluxfill-data"),
        help="tasks database and files (default: %(default)s)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=64, help="queued tasks before 429 (default: %(default)s)"
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="images run together in one pass, at most (default: %(default)s)",
    )
    serve.add_argument(
        "--retention-hours",
        type=float,
        default=24.0,
        help="keep output files this long (default: %(default)s)",
    )
    serve.add_argument(
        "--task-retention-days",
        type=float,
        default=30.0,
        help="keep finished tasks (status, events) this long; then they are deleted and unknown "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-mb", type=float, default=64.0, help="request body limit, in MiB (default: %(default)s)"
    )
    limits = serve.add_argument_group("limits against careless and hostile clients (docs/serving.md)")
    limits.add_argument(
        "--body-timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="a request body must arrive within this, else 408 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-inflight-mb",
        type=float,
        default=256.0,
        help="request bodies being read at once, together, in MiB; then 503 (default: %(default)s)",
    )
    limits.add_argument(
        "--max-queue-megapixels",
        type=float,
        default=1024.0,
        help="queued tasks' input megapixels x num_images, together; then 429, a task alone over it 413 "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--url-fetches",
        type=int,
        default=8,
        help="requests with URL inputs checked (downloaded) at once; the others wait (default: %(default)s)",
    )
    limits.add_argument(
        "--lora-cache-mb",
        type=float,
        default=2048.0,
        help="downloaded LoRA files kept, in MiB, least recently used out (default: %(default)s)",
    )
    serve.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="require Authorization: Bearer KEY (repeat for several keys; default: open)",
    )
    serve.add_argument(
        "--admin-key",
        dest="admin_keys",
        action="append",
        default=[],
        metavar="KEY",
        help="a key that sees and cancels every key's tasks (repeatable; also accepted as an --api-key)",
    )
    serve.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM: seconds the running task may still take before it is canceled; new requests "
        "get 503 meanwhile (default: %(default)s)",
    )
    serve.add_argument(
        "--allow-url-inputs",
        action="store_true",
        help="accept http(s) URLs for images, masks, LoRAs and webhooks (public addresses only)",
    )
    serve.add_argument(
        "--url-allow-network",
        dest="trusted_networks",
        action="append",
        default=[],
        type=_network,
        metavar="CIDR",
        help="with --allow-url-inputs: also allow this private network (e.g. internal storage)",
    )
    serve.add_argument(
        "--public-url",
        default="",
        metavar="URL",
        help="the server's address as clients reach it (https://host): webhooks then carry absolute URLs",
    )
    serve.add_argument("--lora-dir", type=Path, help="LoRA files requests may name (relative paths)")
    serve.add_argument(
        "--warmup",
        type=_sizes,
        default=[],
        metavar="WxH,...",
        help="sizes to run once before /healthz says ready (compiles, autotunes)",
    )
    serve.add_argument(
        "--prompt-enhancer", type=Path, metavar="DIR", help="a local text-generation model folder"
    )
    serve.add_argument("--safety-checker", type=Path, metavar="DIR", help="a local safety checker folder")
    scale = serve.add_argument_group('scale-out (Ray Serve; pip install "fluxfill-engine[ray]")')
    scale.add_argument(
        "--ray", action="store_true", help="run the engines as Ray Serve replicas (one GPU each)"
    )
    scale.add_argument(
        "--replicas", type=int, default=1, help="with --ray: engine replicas (default: %(default)s)"
    )
    scale.add_argument(
        "--autoscale",
        type=_autoscale,
        metavar="MIN,MAX",
        help="with --ray: autoscale between MIN and MAX replicas on queue length instead of --replicas",
    )
    scale.add_argument(
        "--ray-address",
        help="with --ray: an existing cluster ('auto' or ray://HOST:10001; default: a local one)",
    )
    serve.add_argument(
        "--webhook-secret", help="Standard Webhooks secret (default: generated, kept in --data-dir)"
    )
    serve.set_defaults(run=run_serve)


def check_serve_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before anything loads (one line naming the flag)."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1-65535, got {args.port}")
    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--max-batch", args.max_batch, 1)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.retention_hours <= 0 or args.max_request_mb <= 0 or args.task_retention_days <= 0:
        raise ValueError("--retention-hours, --task-retention-days and --max-request-mb must be positive")
    for flag, value in (
        ("--body-timeout-s", args.body_timeout_s),
        ("--max-inflight-mb", args.max_inflight_mb),
        ("--max-queue-megapixels", args.max_queue_megapixels),
        ("--url-fetches", args.url_fetches),
        ("--lora-cache-mb", args.lora_cache_mb),
    ):
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    check_model_paths(args)
    for flag, folder in (
        ("--lora-dir", args.lora_dir),
        ("--prompt-enhancer", args.prompt_enhancer),
        ("--safety-checker", args.safety_checker),
    ):
        if folder is not None and not folder.exists():
            raise ValueError(f"{flag}: no such file or folder: {str(folder)!r}")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise ValueError(f"--lora-dir: {str(args.lora_dir)!r} is not a folder")
    if args.trusted_networks and not args.allow_url_inputs:
        raise ValueError("--url-allow-network needs --allow-url-inputs")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if not args.ray and (args.replicas != 1 or args.autoscale or args.ray_address):
        raise ValueError("--replicas, --autoscale and --ray-address need --ray")
    if any(not key.strip() for key in args.api_keys):
        raise ValueError("--api-key: an empty key would let anyone in")
    if any(not key.strip() for key in args.admin_keys):
        raise ValueError("--admin-key: an empty key would let anyone in")
    if not 0 <= args.shutdown_grace_s <= 3600:
        raise ValueError(f"--shutdown-grace-s must be in 0-3600 seconds, got {args.shutdown_grace_s}")


def run_serve(args: argparse.Namespace) -> int:
    """Run ``fluxfill serve`` until interrupted: the flags checked, then the server started."""
    check_serve_args(args)
    try:
        from ..serve.main import start_server
    except ImportError as err:
        raise ValueError(
            f'fluxfill serve needs the serve extra: pip install "fluxfill-engine[serve]" ({err})'
        ) from None
    model = resolve_model_arguments(args)
    start_server(args, device=model.device, dtype=model.dtype)
    return 0
