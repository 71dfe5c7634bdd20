"""JSON API for scripts: live inference (the atlas pages' JSON twins live next to their pages)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import api_models as M
from .infer import run_inference

router = APIRouter(prefix="/api", tags=["api"])


@router.post("/infer", response_model=M.InferResponse,
             responses={413: {"model": M.ErrorBody}, 422: {"model": M.ErrorBody}, 429: {"model": M.ErrorBody},
                        503: {"model": M.ErrorBody}})
async def api_infer(request: Request, body: M.InferRequest) -> M.InferResponse:
    """Run the pLM and an SAE on one sequence: its strongest latents and per-residue heatmaps of chosen ones."""
    return await run_inference(request, body.sequence, body.sae_id, list(dict.fromkeys(body.latents)), body.top_k)
