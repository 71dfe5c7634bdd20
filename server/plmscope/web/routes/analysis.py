"""The /analysis page and its JSON twin: layer-level counts of `plmscope analyze` (family
specificity, activation patterns, concept coverage), the linear probes with their top latents per
class, and the family-specific latents.  Every latent links to its page.

The data come from ``AtlasReader.analysis`` as dataclasses; this route adds only the URLs.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...store.analysis_reads import SaeAnalysis, SaeHeader
from ..deps import Reader
from ..templating import make_url

router = APIRouter(tags=["analysis"])


def _build(request: Request, reader: Reader) -> dict:
    page = reader.analysis()
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


# Plain def handlers: FastAPI runs them (the atlas read and the rendering) in its thread pool.
@router.get("/analysis.json", summary="Analysis summary (JSON)")
def analysis_json(request: Request, reader: Reader):
    return JSONResponse(_build(request, reader))


@router.get("/analysis", include_in_schema=False)
def analysis_page(request: Request, reader: Reader):
    data = _build(request, reader)
    if request.query_params.get("format") == "json":
        return JSONResponse(data)
    return request.app.state.templates.TemplateResponse(request, "analysis.html", {"data": data})
