"""Operations routes, open without an API key: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from server.api.state import state_of

router = APIRouter()


# The bodies, for the OpenAPI document (the routes build them by hand, as probes want them cheap).
class EngineRequests(BaseModel):
    waiting: int
    running: int
    tracked: int


class Alive(BaseModel):
    status: Literal["ok", "loading"]
    requests: EngineRequests | None = None  # absent while loading


class Unhealthy(BaseModel):
    status: Literal["unhealthy"]
    reason: str


class Readiness(BaseModel):
    status: Literal["ready", "loading", "draining", "stopped"]


@router.get(
    "/health",
    responses={200: {"model": Alive}, 503: {"model": Unhealthy, "description": "The model failed to load, or the engine loop died or stalled."}},
)
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while loading and while the engine loop is alive and stepping."""
    state = state_of(request)
    engine = state.engine
    if state.load_error:
        return JSONResponse({"status": "unhealthy", "reason": state.load_error}, status_code=503)
    if engine is None:
        return JSONResponse({"status": "loading"})
    if not engine.alive:
        return JSONResponse({"status": "unhealthy", "reason": "the engine loop has stopped"}, status_code=503)
    silent = time.monotonic() - engine.heartbeat
    if silent > state.config.stall_timeout:
        reason = f"the engine loop has not stepped for {silent:.0f} s"
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    # What the engine still tracks: after a burst or a disconnect storm, all three return to 0.
    requests = {"waiting": engine.num_waiting, "running": engine.num_running, "tracked": engine.num_requests}
    return JSONResponse({"status": "ok", "requests": requests})


@router.get(
    "/ready",
    responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "Loading, draining or stopped."}},
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded, until the server starts draining."""
    state = state_of(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.engine is None or not state.engine.accepting:
        return JSONResponse({"status": "loading" if state.engine is None else "stopped"}, status_code=503)
    return JSONResponse({"status": "ready"})


# `response_class=Response` has no media type of its own, so the 200 is only what is declared here.
METRICS_TEXT = {200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.get("/metrics", response_class=Response, responses=METRICS_TEXT)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
