"""GET /v1/models (the served model, under its id; clients such as Codex probe it) and
GET /health (no key needed: for load balancers and the soak script, with the engine's figures)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from .security import require_api_key

router = APIRouter()


class Model(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "openai"


class ModelList(BaseModel):
    object: str = "list"
    data: list[Model]


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    state = request.app.state.server
    return ModelList(data=[Model(id=state.model_id, created=state.created)]).model_dump()


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    state = request.app.state.server
    state.check_model(model_id)
    return Model(id=state.model_id, created=state.created).model_dump()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """`status` plus the engine's counters: `active` and `queued` sequences, and the prompt
    cache's `cached_entries` / `cached_bytes`."""
    state = request.app.state.server
    stats = dict(state.scheduler.stats)
    return {"status": "ok", "model": state.model_id, **stats}
