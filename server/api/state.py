"""What the routes share: the configuration and, once loaded, the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

from fastapi import Request

from models.types import model_name
from server.api.errors import ModelNotFound
from server.api.logprobs import TokenText
from server.config import Config
from server.engine import Engine
from server.errors import EngineUnavailable
from server.tools import ToolFormat, detect


@dataclass
class AppState:
    config: Config
    engine: Engine | None = None
    load_error: str | None = None
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        """The id clients use for the model (known while it loads, too)."""
        return self.config.served_model_name or model_name(self.config.model)

    @cached_property
    def tool_format(self) -> ToolFormat:
        """How the model writes tool calls: the --tool-call-format, or what its chat template shows."""
        return detect(getattr(self.require_engine().tokenizer, "chat_template", None), self.config.tool_call_format)

    @cached_property
    def token_text(self) -> TokenText:
        """How tokens are named in scores; built once, after the model has loaded."""
        return TokenText(self.require_engine().tokenizer)

    def require_engine(self) -> Engine:
        """The engine, if it takes requests now; else a 503."""
        if self.draining:
            raise EngineUnavailable("the server is shutting down; retry on another replica")
        if self.engine is None:
            raise EngineUnavailable(self.load_error or "the model is still loading; retry shortly")
        return self.engine

    def check_model(self, model: str | None) -> None:
        """A request naming a model must name the served one (else a 404); None takes it."""
        if model is not None and model != self.model_name:
            raise ModelNotFound(f"the model {model!r} does not exist; this server serves {self.model_name!r}", param="model")


def state_of(request: Request) -> AppState:
    return request.app.state.tokenferry
