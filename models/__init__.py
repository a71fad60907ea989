"""Everything that touches tensors: loading, batching, the KV cache, the forward pass and sampling.

Knows nothing of HTTP or asyncio. The service (`server/`) drives it through `ModelRunner`. The package's
names load lazily (PEP 562): `import models` and `models.types` cost no torch, so the server's HTTP side, its
configuration and its scheduler import without it; `models.load` or `models.ModelRunner` loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.loader import LoadedModel, ModelInfo, ModelLoadError, load
    from models.prefix_cache import for_model as prefix_cache_for
    from models.runner import ModelRunner

_EXPORTS = {
    "LoadedModel": "models.loader",
    "ModelInfo": "models.loader",
    "ModelLoadError": "models.loader",
    "load": "models.loader",
    "ModelRunner": "models.runner",
    "prefix_cache_for": "models.prefix_cache",
}
__all__ = ["LoadedModel", "ModelInfo", "ModelLoadError", "ModelRunner", "load", "prefix_cache_for"]


_RENAMED = {"prefix_cache_for": "for_model"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'models' has no attribute {name!r}")
