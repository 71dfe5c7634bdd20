"""What a latent does, live: the perturbation panel (/perturb: ablate, clamp or steer latents on a
sequence and see what the model then predicts) and the mutation scan (/scan: every substitution in
a residue window, its effect on latents and the model's own variant score).

Both are permalinks (every setting in the URL), each with a JSON twin, and run on the live
inference worker under its limits: the client's rate (429), the queue (503), the sequence length,
and for the scan ``scan_max_window`` residues (bigger scans: ``plmscope scan``).
"""

# no `from __future__ import annotations`: FastAPI resolves string annotations in module globals only
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ...causal.effects import EffectSettings, intervention_effect
from ...causal.intervene import Edit, Intervention
from ...causal.scan import ScanSettings, scan
from ...errors import InputError
from ...settings import Settings
from ...store.reader import AtlasReader
from ...vocab import AMINO_ACIDS
from .. import api_models as M
from ..deps import Engine, LiveEngine, Reader, latent_or_404, sae_or_404, unavailable_message
from ..inference import InferenceService, SequenceTooLong, parse_sequence_input
import re

from pydantic import AfterValidator, Field

from ..inputs import MAX_LATENTS, SEQUENCE_HELP, LatentListText, parse_latent_list, sequence_type

# The JSON routes need at least one latent: the same list as LatentListText, not empty.
SOME_LATENTS_PATTERN = rf"^[ ,]*[0-9]+(?:[ ,]+[0-9]+){{0,{MAX_LATENTS - 1}}}[ ,]*$"


def _some_latents(text: str) -> str:
    if re.fullmatch(SOME_LATENTS_PATTERN, text) is None:
        raise ValueError(f"name 1 to {MAX_LATENTS} latents, comma-separated, e.g. 12,345")
    return text


SomeLatents = Annotated[str, Field(max_length=400, json_schema_extra={"pattern": SOME_LATENTS_PATTERN}),
                        AfterValidator(_some_latents)]
from .common import json_doc, page_doc, pick_format
from .infer import client_key

ERRORS = (404, 429, 503)
MASKED_MAX_RESIDUES = 256  # masked marginals cost two forwards per residue


async def _prepare(request: Request, engine: InferenceService, reader: AtlasReader, text: str, sae: Optional[str],
                   latents: list[int]):
    _, seq, _ = parse_sequence_input(text)
    s = await run_in_threadpool(sae_or_404, reader, sae)
    if not latents:
        raise HTTPException(422, "name at least one latent: latents=12,345")
    for lat in latents:
        latent_or_404(s, lat)
    limit = engine.max_length(s["sae_id"])
    if len(seq) > limit:
        raise SequenceTooLong(f"the sequence has {len(seq)} residues; this server accepts at most {limit}")
    return seq, s


def _check_range(start: Optional[int], end: Optional[int], length: int) -> None:
    """404 for a residue range that selects no residue: the schema cannot know the sequence's length."""
    first, last = start or 1, min(end or length, length)
    if first > last:
        raise HTTPException(404, f"residues {first}..{end or length} select no residue of this {length}-residue sequence")


async def perturb(request: Request, engine: InferenceService, reader: AtlasReader, text: str, sae: Optional[str],
                  latents: list[int], mode: str, value: float, start: Optional[int], end: Optional[int],
                  masked: bool) -> M.PerturbResponse:
    seq, s = await _prepare(request, engine, reader, text, sae, latents)
    if masked and len(seq) > MASKED_MAX_RESIDUES:
        raise InputError(f"masked marginals run two passes per residue; live, at most {MASKED_MAX_RESIDUES} residues "
                         f"(this sequence has {len(seq)})")
    _check_range(start, end, len(seq))
    briefs = await run_in_threadpool(reader.latent_briefs, s["sae_id"], latents)
    corpus_max = {lat: float(briefs[lat]["max_act"]) for lat in latents if briefs.get(lat, {}).get("max_act")}
    iv = Intervention(tuple(Edit(lat, mode, value if mode != "ablate" else 0.0) for lat in latents), start, end, corpus_max)
    iv.check(s["d_sae"], len(seq))
    engine.check_rate(client_key(request))
    model = engine.models[s["sae_id"]]
    eff = await engine.run_job(intervention_effect, model.plm, model.sae, seq, iv, EffectSettings(masked_marginals=masked))
    rows = iv.rows(len(seq))
    return M.PerturbResponse(
        atlas_id=reader.atlas_id, sae_id=s["sae_id"], sequence=seq, length=len(seq), start=rows.start + 1, end=rows.stop,
        edits=[M.PerturbEdit(latent=e.latent, mode=e.mode, value=e.value, target=round(iv.target(e), 6),
                             corpus_max=corpus_max.get(e.latent)) for e in iv.edits],
        marginals=eff.marginals, total_delta_loss=round(eff.total_delta_loss, 6), mean_delta_loss=round(eff.mean_delta_loss, 6),
        delta_logprob=[round(float(v), 5) for v in eff.delta_logprob], amino_acids=AMINO_ACIDS,
        delta_aa=[[round(float(v), 5) for v in row] for row in eff.delta_aa.T],
        clean_top=eff.clean_top, steered_sequence=eff.steered_sequence,
        changed_residues=[M.ChangedResidue(**r) for r in eff.changed_residues()],
    )


async def scan_view(request: Request, engine: InferenceService, reader: AtlasReader, settings: Settings, text: str,
                    sae: Optional[str], latents: list[int], start: Optional[int], end: Optional[int]) -> M.ScanResponse:
    seq, s = await _prepare(request, engine, reader, text, sae, latents)
    _check_range(start, end, len(seq))
    first = start or 1
    last = min(end or first + settings.scan_max_window - 1, len(seq))
    note = None
    if last - first + 1 > settings.scan_max_window:
        note = (f"a live scan mutates at most {settings.scan_max_window} residues: residues {first}.."
                f"{first + settings.scan_max_window - 1} of the {first}..{last} asked; scan whole proteins with `plmscope scan`")
        last = first + settings.scan_max_window - 1
    engine.check_rate(client_key(request))
    model = engine.models[s["sae_id"]]
    res = await engine.run_job(scan, model.plm, model.sae, seq, latents, ScanSettings(start=first, end=last))
    positions, score = res.score_grid()
    grids = []
    for lat in latents:
        _, grid = res.grid(lat, "site")
        k = res.latents.index(lat)
        grids.append(M.ScanGrid(latent=lat, wild_type=[round(float(res.wild_type[p - 1, k]), 5) for p in positions],
                                delta=[[round(float(v), 5) for v in row] for row in grid]))
    return M.ScanResponse(
        atlas_id=reader.atlas_id, sae_id=s["sae_id"], sequence=seq, length=len(seq), start=first, end=last,
        positions=positions, amino_acids=AMINO_ACIDS, n_variants=res.n_variants, grids=grids, score_name=res.score_name,
        score=None if score is None else [[round(float(v), 5) for v in row] for row in score], note=note,
    )


def _context(request: Request, reader_saes: list[dict], engine, **form) -> dict:
    return {"saes": reader_saes, "model_available": engine is not None, "unavailable": unavailable_message(request), **form}


def make_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["causal"])
    Sequence = sequence_type(settings)
    PageSequence = sequence_type(settings, blank_ok=True)
    seq_help = f"{SEQUENCE_HELP}; at most {settings.max_residues} residues"
    SAEQuery = Annotated[Optional[str], Query(description="SAE (default: the atlas's first)")]
    Latents = Annotated[Optional[LatentListText], Query(description="latents to act on, comma-separated")]
    RequiredLatents = Annotated[SomeLatents, Query(description="latents to act on, comma-separated (at least one)")]
    Mode = Annotated[Literal["ablate", "clamp", "steer"], Query(description="ablate (set to 0), clamp (set to value) or "
                                                               "steer (set to value x the latent's corpus maximum)")]
    Value = Annotated[float, Query(ge=0, le=1000, description="clamp: activation; steer: multiple of the corpus maximum (0-5)")]
    Start = Annotated[Optional[int], Query(ge=1, le=100000, description="first residue (1-based)")]
    End = Annotated[Optional[int], Query(ge=1, le=100000, description="last residue (inclusive)")]
    Masked = Annotated[bool, Query(description="ESM-2: masked marginals (two passes per residue) instead of wild-type")]

    async def perturb_json(request: Request, reader: Reader, engine: LiveEngine,
                           seq: Annotated[Sequence, Query(description=seq_help)], latents: RequiredLatents,
                           sae: SAEQuery = None, mode: Mode = "ablate", value: Value = 0.0, start: Start = None,
                           end: End = None, masked: Masked = False):
        m = await perturb(request, engine, reader, seq, sae, parse_latent_list(latents), mode, value, start, end, masked)
        return JSONResponse(m.model_dump(mode="json"))

    router.add_api_route("/perturb.json", perturb_json, methods=["GET"], summary="Ablate, clamp or steer latents on a sequence",
                         **json_doc(M.PerturbResponse, *ERRORS))

    @router.get("/perturb", summary="The perturbation panel (page; the form alone without seq)", **page_doc(*ERRORS))
    async def perturb_page(request: Request, reader: Reader, engine: Engine,
                           seq: Annotated[Optional[PageSequence], Query(description=seq_help)] = None,
                           latents: Latents = None, sae: SAEQuery = None, mode: Mode = "ablate", value: Value = 0.0,
                           start: Start = None, end: End = None, masked: Masked = False):
        fmt = pick_format(request, None)
        ready = bool(seq and seq.strip() and latents)
        if fmt != "html":
            if not ready:
                raise HTTPException(422, "give a sequence and latents: /perturb.json?seq=MKT...&latents=12")
            if engine is None:
                raise HTTPException(503, unavailable_message(request))
            return await perturb_json(request, reader, engine, seq, latents, sae, mode, value, start, end, masked)
        m, status = None, 200
        if ready and engine is None:
            status = 503
        elif ready:
            m = await perturb(request, engine, reader, seq, sae, parse_latent_list(latents), mode, value, start, end, masked)
        saes = await run_in_threadpool(reader.saes)
        ctx = _context(request, saes, engine, m=m, data=m.model_dump(mode="json") if m else None, seq_text=seq or "",
                       sae=sae or (saes[0]["sae_id"] if saes else None), latents_text=latents or "", mode=mode,
                       value=value, start=start, end=end, masked=masked)
        return await run_in_threadpool(request.app.state.templates.TemplateResponse, request, "perturb.html", ctx,
                                       status_code=status)

    async def scan_json(request: Request, reader: Reader, engine: LiveEngine,
                        seq: Annotated[Sequence, Query(description=seq_help)], latents: RequiredLatents,
                        sae: SAEQuery = None, start: Start = None, end: End = None):
        m = await scan_view(request, engine, reader, settings, seq, sae, parse_latent_list(latents), start, end)
        return JSONResponse(m.model_dump(mode="json"))

    router.add_api_route("/scan.json", scan_json, methods=["GET"],
                         summary=f"Mutation scan of latents over at most {settings.scan_max_window} residues",
                         **json_doc(M.ScanResponse, *ERRORS))

    @router.get("/scan", summary="The mutation-scan view (page; the form alone without seq)", **page_doc(*ERRORS))
    async def scan_page(request: Request, reader: Reader, engine: Engine,
                        seq: Annotated[Optional[PageSequence], Query(description=seq_help)] = None,
                        latents: Latents = None, sae: SAEQuery = None, start: Start = None, end: End = None):
        fmt = pick_format(request, None)
        ready = bool(seq and seq.strip() and latents)
        if fmt != "html":
            if not ready:
                raise HTTPException(422, "give a sequence and latents: /scan.json?seq=MKT...&latents=12")
            if engine is None:
                raise HTTPException(503, unavailable_message(request))
            return await scan_json(request, reader, engine, seq, latents, sae, start, end)
        m, status = None, 200
        if ready and engine is None:
            status = 503
        elif ready:
            m = await scan_view(request, engine, reader, settings, seq, sae, parse_latent_list(latents), start, end)
        saes = await run_in_threadpool(reader.saes)
        ctx = _context(request, saes, engine, m=m, data=m.model_dump(mode="json") if m else None, seq_text=seq or "",
                       sae=sae or (saes[0]["sae_id"] if saes else None), latents_text=latents or "", start=start, end=end,
                       max_window=settings.scan_max_window)
        return await run_in_threadpool(request.app.state.templates.TemplateResponse, request, "scan.html", ctx,
                                       status_code=status)

    return router
