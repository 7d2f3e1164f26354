"""fluxfill-engine: FLUX.1 Fill [dev] inpainting; drop-in for diffusers' FluxFillPipeline."""

from .config import EngineConfig
from .engine import Event, FillRequest, FillResult, FluxFillEngine
from .pipeline import FluxFillPipeline

__version__ = "0.1.0"

__all__ = [
    "EngineConfig",
    "Event",
    "FillRequest",
    "FillResult",
    "FluxFillEngine",
    "FluxFillPipeline",
    "__version__",
]
