"""fluxfill-engine: FLUX.1 Fill [dev] inpainting, fast and lean, as a drop-in for diffusers' FluxFillPipeline."""

from .config import EngineConfig

from .pipeline import FluxFillPipeline

__version__ = "0.1.0"

__all__ = ["EngineConfig", "FillRequest", "FillResult", "FluxFillEngine", "FluxFillPipeline", "__version__"]
