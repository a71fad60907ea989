"""The FastAPI application and the process that serves it.

`create_app(config, engine=None)` wires routes, middleware and errors. Without an engine, the model loads in
the background once the server listens, so `/health` answers 200 and `/ready` 503 until it is ready.
`serve(config)` runs uvicorn with a drain on SIGTERM or SIGINT: `/ready` turns 503 and new requests get
503 at once, requests in flight finish (up to `--drain-timeout`, then they are aborted), and the process
exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

import models
from server import __version__, metrics
from server.api import anthropic, document, errors, ops, openai, responses, tokens, web, workers
from server.api.middleware import REQUEST_ID_HEADER, BodyLimitMiddleware, RequestIdMiddleware
from server.api.state import AppState
from server.config import Config
from server.engine import Engine
from server.prompt import supports_tools

log = logging.getLogger(__name__)

def create_app(config: Config, engine: Engine | None = None) -> FastAPI:
    """The application. With `engine` given (already started), the caller owns its lifetime."""
    state = AppState(config=config, engine=engine)
    if engine is not None:
        metrics.MODEL_SERVER_PROTOCOL.serve(state.model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(state)) if engine is None else None
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        if engine is None and state.engine is not None:
            await state.engine.shutdown(drain=True, timeout=config.drain_timeout)

    # /docs and /redoc are off: their pages load scripts from a CDN, which a server without network cannot
    # reach. /openapi.json stays, for any viewer or client generator. The body limit applies to every route.
    app = FastAPI(
        title="tokenferry",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        responses=errors.documented(errors.PayloadTooLarge),
    )
    app.state.tokenferry = state
    errors.install(app)
    document.install(app)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(tokens.router)
    app.include_router(workers.router)
    if config.web_ui:
        app.include_router(web.router)
    # Added innermost first: the request id wraps everything, CORS headers reach error answers too.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
        )
    app.add_middleware(RequestIdMiddleware)
    return app


async def _load(state: AppState) -> None:
    config = state.config
    started = time.monotonic()
    try:
        # In a worker thread: `models.load` imports torch first (seconds), and /health must answer meanwhile.
        loaded = await asyncio.to_thread(lambda: models.load(config.model, config.device, config.dtype, config.quantization))
    except models.ModelLoadError as exc:
        state.load_error = str(exc)
        log.error("model load failed", extra={"error": str(exc)})
        return
    engine = Engine(loaded, config.budgets, config.prefix_cache_bytes)
    engine.start()
    state.engine = engine
    metrics.MODEL_SERVER_PROTOCOL.serve(state.model_name)
    info = loaded.info
    log.info(
        "ready",
        extra={
            "model": state.model_name,
            "device": info.device,
            "dtype": info.dtype,
            "quantization": info.quantization,
            "tool_call_format": state.tool_format.name,
            "tool_template": "native" if supports_tools(loaded.tokenizer) else "system message",
            "load_s": round(time.monotonic() - started, 2),
        },
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before the usual graceful shutdown, and exit code 0 after it."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own handler, the signal is not re-raised after shutdown: a drained exit is a clean one.
        if self._drain_deadline is not None:
            log.warning("second signal: stopping now")
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.state.config.drain_timeout
        log.info("draining", extra={"signal": sig, "timeout_s": self.state.config.drain_timeout})

    async def on_tick(self, counter: int) -> bool:
        engine = self.state.engine
        if self.state.load_error:
            self.exit_code = 1
            self.should_exit = True
        elif self._drain_deadline is not None and not self.should_exit:
            in_flight = engine.num_requests if engine else 0
            if in_flight == 0:
                self.should_exit = True
            elif time.monotonic() > self._drain_deadline:
                log.warning("drain timed out; aborting what is left", extra={"requests": in_flight})
                await engine.shutdown(drain=False)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: Config) -> int:
    """Serve until signalled; returns the process exit code."""
    log.info("config", extra={"config": config.public()})
    app = create_app(config)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_config=None,  # logging is already set up, as JSON lines
            timeout_graceful_shutdown=config.drain_timeout,
        ),
        app.state.tokenferry,
    )
    server.run()
    return server.exit_code
