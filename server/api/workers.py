"""What a gateway reads to register this server as one of its workers and to weigh its load: the SGLang
Model Gateway's /model_info and /server_info (and the /get_* names it falls back to) and /get_load (which
its power_of_two policy polls), in SGLang's shapes.

The gateway registers a worker once its /health answers, which it does while the model loads: so
/server_info answers then too, with the served model's id (what the gateway files the worker under) and
nulls for what only the loaded model knows; /model_info waits for the model (503). The gateway reads the
tokenizer from `tokenizer_path` when it can (for routing by tokens; by text, as its HTTP router does, it
needs none). Under the API key like /v1/models: they name local paths.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from server import __version__
from server.api.auth import require_api_key
from server.api.errors import Unauthorized, documented
from server.api.state import state_of
from server.errors import EngineUnavailable

router = APIRouter(dependencies=[Depends(require_api_key)], responses=documented(Unauthorized, EngineUnavailable))


class ModelInfo(BaseModel):
    model_path: str  # the folder or GGUF file the weights came from (`tiny` for the test model)
    tokenizer_path: str | None  # the folder the tokenizer was read from; None for `tiny`
    is_generation: bool
    model_type: str
    architectures: list[str]


class ServerInfo(BaseModel):
    served_model_name: str
    version: str
    loaded: bool
    # What the loaded model says; null while it loads.
    model_path: str | None
    tokenizer_path: str | None
    context_length: int | None
    dtype: str | None
    quantization: str | None
    max_running_requests: int  # --max-batch-size: rows in the running batch
    max_total_tokens: int  # --max-batch-tokens: rows x padded length of the running batch
    max_prefill_tokens: int
    max_queued_requests: int  # --max-waiting


@router.get("/model_info")
@router.get("/get_model_info", include_in_schema=False)
async def model_info(request: Request) -> ModelInfo:
    """The model behind this server, as SGLang describes it."""
    info = state_of(request).require_engine().info
    return ModelInfo(
        model_path=info.source,
        tokenizer_path=info.tokenizer_source,
        is_generation=True,
        model_type=info.model_type,
        architectures=list(info.architectures),
    )


@router.get("/server_info")
@router.get("/get_server_info", include_in_schema=False)
async def server_info(request: Request) -> ServerInfo:
    """The served model's id and the limits this server runs under, as SGLang names them."""
    state = state_of(request)
    info = state.engine.info if state.engine is not None else None
    budgets = state.config.budgets
    return ServerInfo(
        served_model_name=state.model_name,
        version=__version__,
        loaded=info is not None,
        model_path=info and info.source,
        tokenizer_path=info and info.tokenizer_source,
        context_length=info and info.context_length,
        dtype=info and info.dtype,
        quantization=info and info.quantization,
        max_running_requests=budgets.max_batch_size,
        max_total_tokens=budgets.max_batch_tokens,
        max_prefill_tokens=budgets.max_prefill_tokens,
        max_queued_requests=budgets.max_waiting,
    )


class Load(BaseModel):
    dp_rank: int  # always 0: one engine per server
    num_reqs: int  # running and waiting
    num_waiting_reqs: int
    num_tokens: int  # rows x padded length of the running batch


@router.get("/get_load")
async def get_load(request: Request) -> list[Load]:
    """The engine's load, one entry per data-parallel rank (SGLang's shape); the power_of_two policy sends
    a request to the less loaded of two replicas by `num_tokens`."""
    engine = state_of(request).require_engine()
    waiting = engine.num_waiting
    return [Load(dp_rank=0, num_reqs=engine.num_running + waiting, num_waiting_reqs=waiting, num_tokens=engine.batch_tokens)]
