"""JSON API for scripts: live inference (the atlas pages' JSON twins live next to their pages)."""

# no `from __future__ import annotations`: FastAPI resolves string annotations in module globals only,
# and these routes' parameter types are built per app inside make_router
from fastapi import APIRouter, Request

from ...settings import Settings
from .. import api_models as M
from ..deps import LiveEngine, Reader
from .common import json_doc
from .infer import INFER_ERRORS, SERVER_TIMING, run_inference, timed_json


def make_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["api"])
    InferRequest = M.infer_request_model(settings)

    @router.post("/infer", **json_doc(M.InferResponse, 400, 413, *INFER_ERRORS, success_headers=SERVER_TIMING))
    async def api_infer(request: Request, reader: Reader, engine: LiveEngine, body: InferRequest) -> M.InferResponse:
        """Run the pLM and an SAE on one sequence: its strongest latents and per-residue heatmaps of chosen ones."""
        # a Response, not the model: FastAPI would validate the model it was just built from again
        return timed_json(request, await run_inference(request, engine, reader, body.sequence, body.sae_id,
                                                       list(dict.fromkeys(body.latents)), body.top_k))

    return router
