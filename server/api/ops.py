"""Operations routes, open without an API key: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.state import state_of

router = APIRouter()


@router.get("/health")
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


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded, until the server starts draining."""
    state = state_of(request)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if state.engine is None or not state.engine.accepting:
        return JSONResponse({"status": "loading" if state.engine is None else "stopped"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
