"""The /analysis page and its JSON twin: layer-level counts of `plmscope analyze` (family
specificity, activation patterns, concept coverage), the linear probes with their top latents per
class, and the family-specific latents.  Every latent links to its page.

The data come from ``AtlasReader.analysis`` as dataclasses; this route adds only the URLs.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ...store.analysis_reads import SaeAnalysis, SaeHeader
from ..templating import make_url
from .common import reader_of

router = APIRouter(tags=["analysis"])


def _build(request: Request) -> dict:
    page = reader_of(request).analysis()
    return {**asdict(page), "saes": [_sae_json(request, s) for s in page.saes]}


def _sae_json(request: Request, sae: SaeHeader) -> dict:
    out = asdict(sae)
    if not isinstance(sae, SaeAnalysis):
        return out

    def link(latent: int) -> str:
        return make_url(request, f"/latents/{sae.sae_id}/{latent}")

    out["probe_latents"] = {
        task: {cls: {sign: [{**asdict(r), "url": link(r.latent)} for r in getattr(latents, sign)]
                     for sign in ("positive", "negative")}
               for cls, latents in classes.items()}
        for task, classes in sae.probe_latents.items()
    }
    out["concepts"] = [
        {**asdict(r), "best_latent_url": link(r.best_latent),
         "latents_url": make_url(request, "/", sae=sae.sae_id, concept=r.concept)}
        for r in sae.concepts
    ]
    out["family_specific"] = [{**asdict(r), "url": link(r.latent)} for r in sae.family_specific]
    return out


@router.get("/analysis.json", summary="Analysis summary (JSON)")
async def analysis_json(request: Request):
    return JSONResponse(await run_in_threadpool(_build, request))


@router.get("/analysis", include_in_schema=False)
async def analysis_page(request: Request):
    if request.query_params.get("format") == "json":
        return await analysis_json(request)
    data = await run_in_threadpool(_build, request)
    return request.app.state.templates.TemplateResponse(request, "analysis.html", {"data": data})
