"""Live inference: the /infer page (a permalink: sequence and latents live in the URL) and helpers."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse

from ...errors import InputError
from .. import api_models as M
from ..inference import RateLimited, parse_sequence_input, sequence_hash
from ..templating import make_url
from ..uploads import parse_structure_upload
from .common import pick_format, reader_of, respond

router = APIRouter(tags=["inference"])

DEFAULT_HEATMAPS = 3  # heatmaps the page shows when the URL names no latents


def client_key(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def unavailable_message(request: Request) -> str:
    reason = getattr(request.app.state, "model_error", None) or "the models are not loaded"
    return f"live inference is not available on this server: {reason}"


def parse_latent_list(text: Optional[str]) -> list[int]:
    if not text:
        return []
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise InputError(f"latents must be comma-separated numbers, e.g. 12,345; got {part!r}")
        out.append(int(part))
    if len(out) > 32:
        raise InputError("at most 32 latents can be shown at once")
    return list(dict.fromkeys(out))


def _sae_id(request: Request, sae: Optional[str]) -> dict:
    saes = reader_of(request).saes()
    if not saes:
        raise HTTPException(404, "this atlas holds no SAE")
    if not sae:
        return saes[0]
    for s in saes:
        if s["sae_id"] == sae:
            return s
    raise HTTPException(404, f"this atlas has no SAE {sae!r}; it has {', '.join(s['sae_id'] for s in saes)}")


async def run_inference(request: Request, text: str, sae: Optional[str], latents: list[int], top_k: int,
                        default_heatmaps: int = 0) -> M.InferResponse:
    service = request.app.state.infer
    if service is None:
        raise HTTPException(503, unavailable_message(request))
    record, seq, ignored = parse_sequence_input(text)
    s = _sae_id(request, sae)
    for lat in latents:
        if not 0 <= lat < s["d_sae"]:
            raise InputError(f"SAE {s['sae_id']} has latents 0..{s['d_sae'] - 1}; there is no latent {lat}")
    service.check_rate(client_key(request))
    result, cached = await service.infer(s["sae_id"], seq)
    top = result.top(top_k)
    chosen = latents or [t["latent"] for t in top[:default_heatmaps]]
    reader = reader_of(request)
    briefs = await run_in_threadpool(reader.latent_briefs, s["sae_id"], [t["latent"] for t in top] + chosen)
    heatmaps = []
    for lat in chosen:
        vec = result.vector(lat)
        mx = max(vec) if vec else 0.0
        heatmaps.append(M.Heatmap(sae_id=s["sae_id"], latent=lat, source="live", activations=vec, max_act=mx,
                                  max_pos=(vec.index(mx) + 1) if mx > 0 else None,
                                  message=None if mx > 0 else "not active on this sequence"))
    return M.InferResponse(
        atlas_id=reader.atlas_id, sae_id=s["sae_id"], record=record, ignored_records=ignored, sequence=seq,
        length=len(seq), sequence_sha256=sequence_hash(seq), cached=cached,
        matched_accession=await run_in_threadpool(reader.accession_for_sequence, seq),
        top_latents=[M.InferLatent(**t, atlas_max_act=briefs.get(t["latent"], {}).get("max_act"),
                                   description=briefs.get(t["latent"], {}).get("description")) for t in top],
        heatmaps=heatmaps,
    )


async def live_heatmap(request: Request, sae_id: str, latent: int, sequence: str) -> M.Heatmap:
    """A latent's activations on a corpus protein whose vector the atlas did not store."""
    service = request.app.state.infer
    if service is None:
        return M.Heatmap(sae_id=sae_id, latent=latent, source="none",
                         message="the atlas stores no activations of this latent on this protein, and "
                         + unavailable_message(request))
    limit = service.max_length(sae_id)
    note = None
    if len(sequence) > limit:
        sequence, note = sequence[:limit], f"computed live on the first {limit} residues (server limit)"
    try:
        service.check_rate(client_key(request))
    except RateLimited as exc:
        return M.Heatmap(sae_id=sae_id, latent=latent, source="none", message=str(exc))
    result, _ = await service.infer(sae_id, sequence)
    vec = result.vector(latent)
    mx = max(vec) if vec else 0.0
    return M.Heatmap(sae_id=sae_id, latent=latent, source="live", activations=vec, max_act=mx,
                     max_pos=(vec.index(mx) + 1) if mx > 0 else None, message=note or ("computed live" if mx > 0 else
                                                                                     "computed live: not active"))


async def _render(request: Request, fmt: str, seq: Optional[str], sae: Optional[str], latents: Optional[str],
                  top_k: int, upload: Optional[dict] = None, upload_error: Optional[str] = None):
    reader = reader_of(request)
    saes = reader.saes()
    context = {"seq_text": seq or "", "saes": saes, "sae": sae or (saes[0]["sae_id"] if saes else None),
               "latents_text": latents or "", "top_k": top_k, "model_available": request.app.state.infer is not None,
               "unavailable": unavailable_message(request), "structure": None, "upload_error": upload_error}
    m = None
    if seq and seq.strip() and fmt == "html" and request.app.state.infer is None:
        # Keep the pasted sequence on the page and say why nothing ran (the notice), with a 503 status.
        templates = request.app.state.templates
        return templates.TemplateResponse(request, "infer.html", {"m": None, "data": None, **context}, status_code=503)
    if seq and seq.strip():
        m = await run_inference(request, seq, sae, parse_latent_list(latents), top_k,
                                default_heatmaps=DEFAULT_HEATMAPS if fmt == "html" else 0)
        if upload is not None:
            context["structure"] = upload
        elif m.matched_accession:
            found = await run_in_threadpool(reader.structures, m.matched_accession)
            context["structure"] = found[0] if found else None
    elif fmt != "html":
        raise HTTPException(422, "give a sequence: /infer.json?seq=MKT...")
    if fmt == "json":
        return respond(request, "json", m, "infer.html")
    if fmt == "csv":
        return respond(request, "csv", m, "infer.html", csv_rows=(t.model_dump() for t in m.top_latents),
                       csv_name="live_top_latents.csv", csv_columns=list(M.InferLatent.model_fields))
    templates = request.app.state.templates
    return templates.TemplateResponse(request, "infer.html", {"m": m, "data": m.model_dump(mode="json") if m else None,
                                                              **context})


def _infer_get(fmt_forced: Optional[str]):
    async def handler(request: Request, seq: Optional[str] = Query(None, max_length=200_000),
                      sae: Optional[str] = Query(None), latents: Optional[str] = Query(None, max_length=400),
                      top_k: int = Query(20, ge=1, le=200)):
        return await _render(request, pick_format(request, fmt_forced), seq, sae, latents, top_k)

    return handler


router.add_api_route("/infer", _infer_get(None), methods=["GET"], include_in_schema=False)
router.add_api_route("/infer.json", _infer_get("json"), methods=["GET"], response_model=M.InferResponse,
                     summary="Live inference on a sequence given in the URL (permalink form of POST /api/infer)")
router.add_api_route("/infer.csv", _infer_get("csv"), methods=["GET"], summary="Live top latents as CSV")


@router.post("/infer", include_in_schema=False)
async def infer_form(request: Request, sequence: str = Form("", max_length=200_000), sae: Optional[str] = Form(None),
                     latents: Optional[str] = Form(None, max_length=400), top_k: int = Form(20, ge=1, le=200),
                     structure: Optional[UploadFile] = File(None)):
    """The page's form.  Without an upload it redirects to the GET permalink."""
    if structure is None or not structure.filename:
        url = make_url(request, "/infer", seq=sequence.strip(), sae=sae, latents=latents,
                       top_k=top_k if top_k != 20 else None)
        return RedirectResponse(url, status_code=303)
    cap = request.app.state.settings.max_upload_bytes
    data = await structure.read(cap + 1)  # in memory only; never written to disk
    upload, error = None, None
    try:
        _, seq, _ = parse_sequence_input(sequence)
        upload = parse_structure_upload(data, structure.filename, seq, cap)
    except InputError as exc:
        error = str(exc)
    return await _render(request, "html", sequence, sae, latents, top_k, upload=upload, upload_error=error)
