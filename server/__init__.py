"""The service: request handling, scheduling, the engine thread and the HTTP API. Never imports torch."""

from importlib.metadata import version as _version

__version__ = _version("tokenferry")
