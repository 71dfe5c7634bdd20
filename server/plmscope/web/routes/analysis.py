"""The /analysis page and its JSON twin: layer-level counts of `plmscope analyze` (family
specificity, activation patterns, concept coverage), the linear probes with their top latents per
class, and the family-specific latents.  Every latent links to its page.

The data come from ``store.analysis_sql.analysis_page`` (all SQL stays in the store layer).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ...store import analysis_sql
from ..templating import make_url

router = APIRouter(tags=["analysis"])


def _build(request: Request) -> dict:
    reader = request.app.state.reader
    # The reader hands each thread its own cursor on the one read-only connection.
    data = analysis_sql.analysis_page(reader.cursor())
    data["atlas_id"] = reader.atlas_id
    for sae in data["saes"]:
        sid = sae["sae_id"]
        link = lambda lat, sid=sid: make_url(request, f"/latents/{sid}/{lat}")  # noqa: E731
        for classes in sae.get("probe_latents", {}).values():
            for signs in classes.values():
                for rows in signs.values():
                    for r in rows:
                        r["url"] = link(r["latent"])
        for r in sae.get("concepts", []):
            r["best_latent_url"] = link(r["best_latent"])
            r["latents_url"] = make_url(request, "/", sae=sid, concept=r["concept"])
        for r in sae.get("family_specific", []):
            r["url"] = link(r["latent"])
    return data


@router.get("/analysis.json", summary="Analysis summary (JSON)")
async def analysis_json(request: Request):
    return JSONResponse(await run_in_threadpool(_build, request))


@router.get("/analysis", include_in_schema=False)
async def analysis_page(request: Request):
    if request.query_params.get("format") == "json":
        return await analysis_json(request)
    data = await run_in_threadpool(_build, request)
    return request.app.state.templates.TemplateResponse(request, "analysis.html", {"data": data})
