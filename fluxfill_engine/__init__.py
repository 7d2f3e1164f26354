"""fluxfill-engine: FLUX.1 Fill [dev] inpainting; drop-in for diffusers' FluxFillPipeline.

The public names load on first use, so ``import fluxfill_engine`` (and ``fluxfill --help``) costs no
torch or diffusers import; ``from fluxfill_engine import FluxFillPipeline`` imports what that needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "EngineConfig": ".config",
    "Event": ".request",
    "FillRequest": ".request",
    "FillResult": ".request",
    "FluxFillEngine": ".engine",
    "FluxFillPipeline": ".pipeline",
    "LoraSpec": ".lora.spec",
    "PipelineCall": ".call",
    "PipelineResult": ".call",
}

__all__ = [
    "EngineConfig",
    "Event",
    "FillRequest",
    "FillResult",
    "FluxFillEngine",
    "FluxFillPipeline",
    "LoraSpec",
    "PipelineCall",
    "PipelineResult",
    "__version__",
]

if TYPE_CHECKING:
    from .call import PipelineCall, PipelineResult
    from .config import EngineConfig
    from .engine import FluxFillEngine
    from .lora.spec import LoraSpec
    from .pipeline import FluxFillPipeline
    from .request import Event, FillRequest, FillResult

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
