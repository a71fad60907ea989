"""Everything that touches tensors: loading, batching, the KV cache, the forward pass and sampling.

Knows nothing of HTTP or asyncio. The service (`server/`) drives it through `ModelRunner`.
"""

from models.loader import LoadedModel, ModelInfo, ModelLoadError, load
from models.runner import ModelRunner

__all__ = ["LoadedModel", "ModelInfo", "ModelLoadError", "ModelRunner", "load"]
