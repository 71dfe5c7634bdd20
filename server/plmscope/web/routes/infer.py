"""Live inference: the /infer page (a permalink: sequence and latents live in the URL), its JSON
and CSV twins, and the helpers the protein page and POST /api/infer share.

The routes are built per app (``make_router(settings)``) because the sequence they accept is
limited by the settings and the OpenAPI schema says so.  Handlers are ``async``: they wait for the
model; every atlas read, structure parse and page rendering runs in the thread pool.
"""

# no `from __future__ import annotations`: FastAPI resolves string annotations in module globals only,
# and these routes' parameter types are built per app inside make_router
import time
from typing import Annotated, Optional

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ...errors import InputError
from ...settings import Settings
from ...store.reader import AtlasReader
from .. import api_models as M
from ..deps import AppSettings, Engine, LiveEngine, Reader, latent_or_404, sae_or_404, unavailable_message
from ..heatmaps import assemble_heatmap, no_heatmap
from ..inference import InferenceService, RateLimited, parse_sequence_input, sequence_hash
from ..inputs import SEQUENCE_HELP, LatentListText, parse_latent_list, sequence_type
from ..templating import make_url
from ..uploads import parse_structure_upload
from .common import REDIRECT, csv_doc, csv_response, errors, json_doc, model_json, page_doc, pick_format

DEFAULT_HEATMAPS = 3  # heatmaps the page shows when the URL names no latents
INFER_ERRORS = (404, 429, 503)  # unknown SAE or latent; rate limit; no model or a full queue
SERVER_TIMING = {"Server-Timing": {
    "description": "where the request's time went, in ms: queue (waiting for a batch), model (that batch's "
                   "pLM + SAE compute), infer (from the queue to the finished result); a cached result has infer only",
    "schema": {"type": "string"}}}
TOP_COLUMNS = list(M.InferLatent.model_fields)


def client_key(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _lookups(reader: AtlasReader, sae_id: str, latents: list[int], seq: str) -> tuple[dict, Optional[str]]:
    return reader.latent_briefs(sae_id, latents), reader.accession_for_sequence(seq)


async def run_inference(request: Request, service: InferenceService, reader: AtlasReader, text: str,
                        sae: Optional[str], latents: list[int], top_k: int, default_heatmaps: int = 0) -> M.InferResponse:
    record, seq, ignored = parse_sequence_input(text)
    s = sae_or_404(reader, sae)  # no query: the SAE rows are read at open
    for lat in latents:
        latent_or_404(s, lat)
    service.check_rate(client_key(request))
    started = time.perf_counter()
    timing: dict = {}
    result, cached = await service.infer(s["sae_id"], seq, timing)
    top = result.top(top_k)
    chosen = latents or [t["latent"] for t in top[:default_heatmaps]]
    briefs, matched = await run_in_threadpool(_lookups, reader, s["sae_id"], [t["latent"] for t in top] + chosen, seq)
    heatmaps = [assemble_heatmap(seq, result.vector(lat), sae_id=s["sae_id"], latent=lat, source="live",
                                 inactive="not active on this sequence", context_free=s["context_free"])
                for lat in chosen]
    request.state.server_timing = server_timing(timing, (time.perf_counter() - started) * 1000)
    return M.InferResponse(
        atlas_id=reader.atlas_id, sae_id=s["sae_id"], record=record, ignored_records=ignored, sequence=seq,
        length=len(seq), sequence_sha256=sequence_hash(seq), cached=cached, matched_accession=matched,
        top_latents=[M.InferLatent(**t, atlas_max_act=briefs.get(t["latent"], {}).get("max_act"),
                                   description=briefs.get(t["latent"], {}).get("description")) for t in top],
        heatmaps=heatmaps,
    )


async def live_heatmap(request: Request, service: Optional[InferenceService], sae_id: str, latent: int,
                       sequence: str, context_free: int = 0) -> M.Heatmap:
    """A latent's activations on a corpus protein whose vector the atlas did not store."""
    if service is None:
        return no_heatmap(sae_id, latent, "the atlas stores no activations of this latent on this protein, and "
                          + unavailable_message(request))
    limit = service.max_length(sae_id)
    note = None
    if len(sequence) > limit:
        sequence, note = sequence[:limit], f"computed live on the first {limit} residues (server limit)"
    try:
        service.check_rate(client_key(request))
    except RateLimited as exc:
        return no_heatmap(sae_id, latent, str(exc))
    result, _ = await service.infer(sae_id, sequence)
    return assemble_heatmap(sequence, result.vector(latent), sae_id=sae_id, latent=latent, source="live",
                            message=note or "computed live", inactive="computed live: not active",
                            context_free=context_free)


def server_timing(timing: dict, infer_ms: float) -> str:
    """The ``Server-Timing`` header of a live result (W3C Server Timing; browsers' network panels
    show it): ``queue`` (waiting for a batch), ``model`` (that batch's compute on the worker
    thread; ``desc`` names the batch size) and ``infer`` (from the queue to the finished response
    model).  A cached result has only ``infer``.  What a client measures beyond ``infer`` is HTTP,
    parsing and serialisation: ``scripts/bench_server.py`` splits ``/api/infer``'s overhead with it."""
    parts = []
    if "model_ms" in timing:
        parts += [f"queue;dur={timing['queue_ms']:.2f}", f'model;dur={timing["model_ms"]:.2f};desc="batch of {timing["batch"]}"']
    return ", ".join(parts + [f"infer;dur={infer_ms:.2f}"])


def timed_json(request: Request, m) -> Response:
    """``model_json(m)`` with the ``Server-Timing`` header ``run_inference`` left on the request."""
    response = model_json(m)
    if getattr(request.state, "server_timing", None):
        response.headers["Server-Timing"] = request.state.server_timing
    return response


def _twin(fmt: str, m: M.InferResponse, request: Request):
    if fmt == "json":
        return timed_json(request, m)
    return csv_response((t.model_dump() for t in m.top_latents), "live_top_latents.csv", TOP_COLUMNS)


async def _page(request: Request, reader: AtlasReader, engine: Optional[InferenceService], seq: Optional[str],
                sae: Optional[str], latents: Optional[str], top_k: int, upload: Optional[dict] = None,
                upload_error: Optional[str] = None):
    saes = await run_in_threadpool(reader.saes)
    context = {"seq_text": seq or "", "saes": saes, "sae": sae or (saes[0]["sae_id"] if saes else None),
               "latents_text": latents or "", "top_k": top_k, "model_available": engine is not None,
               "unavailable": unavailable_message(request), "structure": None, "upload_error": upload_error}
    m, status = None, 200
    if seq and seq.strip():
        if engine is None:
            status = 503  # the page keeps the pasted sequence and its notice says why nothing ran
        else:
            m = await run_inference(request, engine, reader, seq, sae, parse_latent_list(latents), top_k,
                                    default_heatmaps=DEFAULT_HEATMAPS)
            if upload is not None:
                context["structure"] = upload
            elif m.matched_accession:
                found = await run_in_threadpool(reader.structures, m.matched_accession)
                context["structure"] = found[0] if found else None
    ctx = {"m": m, "data": m.model_dump(mode="json") if m else None, **context}
    return await run_in_threadpool(request.app.state.templates.TemplateResponse, request, "infer.html", ctx,
                                   status_code=status)


def make_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["inference"])
    Sequence = sequence_type(settings)
    PageSequence = sequence_type(settings, blank_ok=True)
    seq_help = f"{SEQUENCE_HELP}; at most {settings.max_residues} residues"
    latents_help = "latents to show as heatmaps, comma-separated (at most 32)"
    LatentsQuery = Annotated[Optional[LatentListText], Query(description=latents_help)]
    TopK = Annotated[int, Query(ge=1, le=200, description="how many of the strongest latents to list")]
    SAEQuery = Annotated[Optional[str], Query(description="SAE to run (default: the atlas's first)")]

    def twin(fmt: str):
        async def handler(request: Request, reader: Reader, engine: LiveEngine,
                          seq: Annotated[Sequence, Query(description=seq_help)], sae: SAEQuery = None,
                          latents: LatentsQuery = None, top_k: TopK = 20):
            return _twin(fmt, await run_inference(request, engine, reader, seq, sae, parse_latent_list(latents), top_k), request)

        return handler

    router.add_api_route("/infer.json", twin("json"), methods=["GET"],
                         summary="Live inference on a sequence given in the URL (permalink form of POST /api/infer)",
                         **json_doc(M.InferResponse, *INFER_ERRORS, success_headers=SERVER_TIMING))
    router.add_api_route("/infer.csv", twin("csv"), methods=["GET"], summary="Live top latents as CSV",
                         **csv_doc(*INFER_ERRORS))

    @router.get("/infer", summary="Run a sequence (page; empty form without seq)", **page_doc(*INFER_ERRORS))
    async def infer_page(request: Request, reader: Reader, engine: Engine,
                         seq: Annotated[Optional[PageSequence], Query(description=seq_help)] = None,
                         sae: SAEQuery = None, latents: LatentsQuery = None, top_k: TopK = 20):
        fmt = pick_format(request, None)
        if fmt == "html":
            return await _page(request, reader, engine, seq, sae, latents, top_k)
        if not (seq and seq.strip()):
            raise HTTPException(422, "give a sequence: /infer.json?seq=MKT...")
        if engine is None:
            raise HTTPException(503, unavailable_message(request))
        return _twin(fmt, await run_inference(request, engine, reader, seq, sae, parse_latent_list(latents), top_k), request)

    @router.post("/infer", summary="The page's form: redirects to the GET permalink, or shows an uploaded structure",
                 response_class=HTMLResponse,
                 responses={**page_doc(*INFER_ERRORS)["responses"], **REDIRECT, **errors(400, 413, page=True)})
    async def infer_form(request: Request, reader: Reader, engine: Engine, app_settings: AppSettings,
                         # a field the form leaves out is its empty default
                         sequence: Annotated[PageSequence, Form(description=seq_help)] = "",
                         sae: Annotated[str, Form(description="SAE to run (default: the atlas's first)")] = "",
                         latents: Annotated[LatentListText, Form(description=latents_help)] = "",
                         top_k: Annotated[int, Form(ge=1, le=200)] = 20,
                         structure: Annotated[UploadFile, File(
                             description="PDB or mmCIF file (optionally gzipped) of the sequence's structure",
                             # tells clients (and schemathesis) that any bytes are a file, whatever they spell
                             json_schema_extra={"format": "binary"})] = None):
        text = sequence.strip()
        if structure is None or not structure.filename:
            url = make_url(request, "/infer", seq=text, sae=sae, latents=latents, top_k=top_k if top_k != 20 else None)
            return RedirectResponse(url, status_code=303)
        cap = app_settings.max_upload_bytes
        data = await structure.read(cap + 1)
        upload, error = None, None
        try:
            _, seq, _ = parse_sequence_input(text)
            upload = await run_in_threadpool(parse_structure_upload, data, structure.filename, seq, cap)
        except InputError as exc:
            error = str(exc)
        return await _page(request, reader, engine, text, sae, latents, top_k, upload=upload, upload_error=error)

    return router
