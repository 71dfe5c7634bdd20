"""The /analysis page and its JSON twin: the paper's findings tested across layers (with per-layer
bar charts drawn here as SVG geometry, no JS), then per SAE the layer-level counts of `plmscope
analyze` (family specificity, activation patterns, concept coverage and each concept's sources),
the linear probes with their top latents per class, and the family-specific latents.  Every latent
links to its page.

The data come from ``AtlasReader.analysis`` as dataclasses; this route adds only the URLs.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...store.analysis_reads import Finding, SaeAnalysis, SaeHeader
from .. import api_models as M
from ..deps import Reader
from ..templating import make_url

router = APIRouter(tags=["analysis"])


def _build(request: Request, page) -> dict:
    return {**asdict(page), "saes": [_sae_json(request, s) for s in page.saes],
            "findings": [asdict(f) for f in page.findings]}


CHART_W, CHART_H = 520, 150  # px of the plot area


def finding_chart(f: Finding) -> dict | None:
    """Bars of a finding's values: one group per layer, one bar per series, 95 % interval whiskers,
    and the base rate as a line where the finding has one.  Geometry only; the template draws it."""
    vals = [v for v in f.values if v.value is not None]
    if not vals:
        return None
    series = sorted({v.series for v in f.values})
    layers = sorted({v.layer for v in f.values})
    base = f.details.get("base_rate")
    top = max([v.hi if v.hi is not None else v.value for v in vals] + [base or 0.0])
    ymax = top * 1.1 if top > 0 else 1.0
    y = lambda x: round(CHART_H - (x / ymax) * CHART_H, 2)  # noqa: E731
    gw = CHART_W / len(layers)
    bw = (gw - 12) / len(series)
    bars = []
    for v in vals:
        x = layers.index(v.layer) * gw + 6 + series.index(v.series) * bw
        bars.append({"x": round(x, 2), "w": round(max(bw - 2, 1), 2), "y": y(v.value), "h": round(CHART_H - y(v.value), 2),
                     "cx": round(x + bw / 2 - 1, 2), "lo": None if v.lo is None else y(v.lo),
                     "hi": None if v.hi is None else y(v.hi), "series": series.index(v.series),
                     "title": f"layer {v.layer} · {v.series}: {v.value:.3g}" + (
                         f" [{v.lo:.3g}, {v.hi:.3g}]" if v.lo is not None else "") + (
                         f" ({v.k}/{v.n})" if v.n else (f" ({v.k} associated)" if v.k is not None else ""))})
    return {"width": CHART_W, "height": CHART_H, "bars": bars, "series": series, "ymax": ymax,
            "layers": [{"x": round(i * gw + gw / 2, 2), "label": f"layer {lay}"} for i, lay in enumerate(layers)],
            "base": None if base is None else {"y": y(base), "value": base}}


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
@router.get("/analysis.json", summary="Analysis summary (JSON)", responses={200: {"model": M.AnalysisDoc}})
def analysis_json(request: Request, reader: Reader):
    return JSONResponse(_build(request, reader.analysis()))


@router.get("/analysis", include_in_schema=False)
def analysis_page(request: Request, reader: Reader):
    page = reader.analysis()
    data = _build(request, page)
    if request.query_params.get("format") == "json":
        return JSONResponse(data)
    charts = {f.claim: finding_chart(f) for f in page.findings}
    return request.app.state.templates.TemplateResponse(request, "analysis.html", {"data": data, "charts": charts})
