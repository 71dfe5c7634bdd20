"""Liveness and readiness for load balancers: 200 while the atlas is open."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..api_models import Health
from .common import json_doc

router = APIRouter(tags=["health"])


# async: it reads app.state only, so it answers from the event loop even when every worker thread is busy
@router.get("/health", **json_doc(Health))
@router.get("/health.json", include_in_schema=False)
async def health(request: Request) -> Health:
    state = request.app.state
    reader = getattr(state, "reader", None)
    service = getattr(state, "infer", None)
    return Health(
        status="ok" if reader is not None and service is not None else ("degraded" if reader is not None else "down"),
        atlas_open=reader is not None,
        atlas_id=reader.atlas_id if reader is not None else None,
        model_loaded=service is not None,
        model_error=getattr(state, "model_error", None),
        device=getattr(state, "device", None),
        queue_depth=service.queue_depth if service is not None else 0,
        infer_workers=service.workers if service is not None else 0,
        infer_threads=service.threads if service is not None else 0,
    )
