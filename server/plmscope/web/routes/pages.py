"""Atlas pages: overview + latent table, latent detail, protein search and detail.

Each page has one builder returning its pydantic model; the HTML route, its ``.json`` twin and
(for tables) its ``.csv`` export all call it, so the three can never disagree.  Builders read the
atlas, so handlers are plain ``def`` (FastAPI runs them in its thread pool); the protein page,
which may wait for live inference, is ``async`` and runs its builder and its rendering in threads.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse

from ...store.reader import DEFAULT_SORT, LATENT_SORTS, AtlasReader
from .. import api_models as M
from ..deps import SAE, Engine, Reader, SAEInPath, latent_or_404
from ..heatmaps import assemble_heatmap
from ..templating import make_url
from .common import COMMON_ERRORS, REDIRECT, csv_doc, errors, json_doc, page_doc, pick_format, respond
from .infer import live_heatmap

router = APIRouter(tags=["pages"])

LATENT_COLUMNS = list(M.LatentRow.model_fields)
LatentSort = Literal[tuple(LATENT_SORTS)]  # type: ignore[valid-type]
LatentNumber = Annotated[int, Path(ge=0, description="latent index (0-based)")]


# ---- overview ----
def build_overview(reader: AtlasReader, s: dict, sort, desc, family, type_, category, concept, q, page, per_page,
                   include_dead, csv_all=False) -> M.Overview:
    limit = 100_000 if csv_all else per_page
    offset = 0 if csv_all else (page - 1) * per_page
    rows, total = reader.latent_list(
        s["sae_id"], sort=sort, desc=desc, family=family or None, annotation_type=type_ or None,
        category=category or None, concept=concept or None, q=q, include_dead=include_dead, offset=offset, limit=limit,
    )
    ov = reader.overview()
    facets = reader.latent_facets(s["sae_id"])
    return M.Overview(
        atlas_id=ov["atlas_id"], atlas_file=ov["path"], meta=ov["meta"], corpus=ov["corpus"],
        saes=[M.SAEInfo(**x) for x in ov["saes"]], sae_id=s["sae_id"], has_analysis=ov["has_analysis"],
        query=M.LatentQuery(sort=sort, desc=desc, family=family, annotation_type=type_, category=category,
                            concept=concept, q=q, include_dead=include_dead, page=page, per_page=per_page),
        total=total, latents=[M.LatentRow(**r) for r in rows],
        facets={
            "families": [M.FacetValue(value=f["family"], label=f["name"], n=f["n"]) for f in facets["families"]],
            "annotation_types": [M.FacetValue(value=f["type"], n=f["n"]) for f in facets["annotation_types"]],
            "categories": [M.FacetValue(value=f["category"], n=f["n"]) for f in facets["categories"]],
            "concepts": [M.FacetValue(value=f["concept"], n=f["n"]) for f in facets["concepts"]],
        },
    )


def _overview(fmt_forced: Optional[str]):
    def handler(
        request: Request,
        reader: Reader,
        s: SAE,
        sort: LatentSort = Query(DEFAULT_SORT, description="column to sort the latents by; 'evidence' (default): "
                                 "concept association, then family specificity, then pattern / enrichment, dense "
                                 "and artefact latents last"),
        desc: bool = Query(True),
        family: Optional[str] = Query(None, max_length=200),
        type: Optional[str] = Query(None, max_length=200, description="annotation type"),
        category: Optional[str] = Query(None, max_length=100, description="activation pattern (analysis)"),
        concept: Optional[str] = Query(None, max_length=200),
        q: Optional[str] = Query(None, max_length=200, description="text search"),
        page: int = Query(1, ge=1, le=1_000_000),
        per_page: int = Query(50, ge=1, le=500),
        include_dead: bool = Query(False),
    ):
        fmt = pick_format(request, fmt_forced)
        m = build_overview(reader, s, sort, desc, family, type, category, concept, q, page, per_page, include_dead,
                           csv_all=fmt == "csv")
        return respond(
            request, fmt, m, "overview.html", csv_rows=(r.model_dump() for r in m.latents),
            csv_name=f"latents_{m.sae_id}.csv", csv_columns=LATENT_COLUMNS,
            context={"n_pages": max(1, math.ceil(m.total / per_page))},
        )

    return handler


router.add_api_route("/", _overview(None), methods=["GET"], summary="Atlas overview and the latent table (page)",
                     **page_doc(404))
router.add_api_route("/.json", _overview("json"), methods=["GET"], summary="Atlas overview and one page of the latent table",
                     **json_doc(M.Overview, 404))
router.add_api_route("/.csv", _overview("csv"), methods=["GET"], summary="The latent table (all matching rows) as CSV",
                     **csv_doc(404))


@router.get("/random", summary="A random live latent (redirect to its page)", status_code=303,
            response_class=RedirectResponse, responses={**REDIRECT, **errors(*COMMON_ERRORS, 404, page=True)})
def random_latent(request: Request, reader: Reader, s: SAE):
    latent = reader.random_latent(s["sae_id"])
    if latent is None:
        raise HTTPException(404, f"SAE {s['sae_id']} has no live latent")
    return RedirectResponse(make_url(request, f"/latents/{s['sae_id']}/{latent}"), status_code=303)


def viewer_structure(s: dict, title: str) -> dict:
    """What the 3D viewer needs of a structure (the page embeds it as JSON)."""
    return {"content": s["content"], "residues": s["residues"], "chain": s["chain"], "is_prediction": s["is_prediction"],
            "title": f"{title} · {s['file_name']} chain {s['chain']}" + (" (predicted)" if s["is_prediction"] else ""),
            "coverage": s["coverage"], "identity": s["identity"]}


# ---- latent ----
def _hist_geometry(hist: dict, width: int = 560, height: int = 160) -> dict:
    """Bars of the log-x histogram, trimmed to the occupied range; computed here so the chart needs no JS."""
    counts, edges = hist["counts"], hist["edges"]
    nz = [i for i, c in enumerate(counts) if c > 0]
    if not nz:
        return {"bars": [], "width": width, "height": height, "ticks": [], "ymax": 0}
    lo, hi = max(nz[0] - 1, 0), min(nz[-1] + 1, len(counts) - 1)
    n = hi - lo + 1
    ymax = max(counts)
    bw = width / n
    bars = []
    for j, i in enumerate(range(lo, hi + 1)):
        h = 0 if ymax == 0 else counts[i] / ymax * (height - 4)
        bars.append({"x": round(j * bw, 2), "w": round(max(bw - 1, 1), 2), "y": round(height - h, 2), "h": round(h, 2),
                     "lo": edges[i], "hi": edges[i + 1], "count": counts[i]})
    ticks = []
    for j, i in enumerate(range(lo, hi + 2)):
        e = edges[i]
        if abs(math.log10(e) - round(math.log10(e))) < 1e-6:
            ticks.append({"x": round(j * bw, 2), "label": f"{e:g}"})
    return {"bars": bars, "width": width, "height": height, "ticks": ticks, "ymax": ymax}


def build_latent(reader: AtlasReader, s: dict, latent: int) -> M.LatentDetail:
    d = reader.latent(s["sae_id"], latent_or_404(s, latent))
    if d is None:
        raise HTTPException(404, f"SAE {s['sae_id']} has no latent {latent}")
    return M.LatentDetail(atlas_id=reader.atlas_id, **d)


EXAMPLE_COLUMNS = ["kind", "bin", "rank", "accession", "label", "length", "max_act", "max_pos", "n_active"]


def _latent(fmt_forced: Optional[str]):
    def handler(request: Request, reader: Reader, s: SAEInPath, latent: LatentNumber):
        fmt = pick_format(request, fmt_forced)
        m = build_latent(reader, s, latent)
        examples = m.top_examples + [e for b in m.bins for e in b.examples]
        structures = {}
        if fmt == "html":
            for ex in examples:
                if ex.has_structure and ex.accession not in structures:
                    found = reader.structures(ex.accession)[:1]
                    if found:
                        structures[ex.accession] = viewer_structure(found[0], f"{ex.accession} · {ex.label}")

        def example_heatmap(ex: M.Example) -> M.Heatmap:
            # one colour scale for every example: the latent's corpus maximum
            return assemble_heatmap(ex.sequence, ex.activations, sae_id=m.sae_id, latent=m.latent, source="atlas",
                                    scale=m.stats.get("max_act"), max_pos=ex.max_pos, context_free=s["context_free"])

        if fmt == "json":  # the page's own context is for the template only
            return respond(request, fmt, m, "latent.html")
        return respond(
            request, fmt, m, "latent.html", csv_rows=[e.model_dump() for e in examples],
            csv_name=f"{m.sae_id}_{latent}_examples.csv", csv_columns=EXAMPLE_COLUMNS,
            context={"hist": _hist_geometry(m.histogram.model_dump()), "structures": structures,
                     "saes": reader.saes(), "example_heatmap": example_heatmap},
        )

    return handler


router.add_api_route("/latents/{sae_id}/{latent:int}", _latent(None), methods=["GET"], summary="One latent (page)",
                     **page_doc(404))
router.add_api_route("/latents/{sae_id}/{latent:int}.json", _latent("json"), methods=["GET"],
                     summary="One latent: statistics, examples, bins, enrichment, evidence",
                     **json_doc(M.LatentDetail, 404))
router.add_api_route("/latents/{sae_id}/{latent:int}.csv", _latent("csv"), methods=["GET"],
                     summary="One latent's examples as CSV", **csv_doc(404))


# ---- proteins ----
PROTEIN_COLUMNS = ["accession", "label", "entry_name", "protein_name", "organism", "length", "families", "locations",
                   "has_structure"]


def _protein_search(fmt_forced: Optional[str]):
    def handler(request: Request, reader: Reader, q: str = Query("", max_length=200),
                page: int = Query(1, ge=1, le=100_000), per_page: int = Query(50, ge=1, le=500)):
        fmt = pick_format(request, fmt_forced)
        rows, total = reader.search_proteins(q, limit=per_page if fmt != "csv" else 100_000,
                                             offset=(page - 1) * per_page if fmt != "csv" else 0)
        m = M.ProteinSearch(atlas_id=reader.atlas_id, q=q, total=total, proteins=[M.ProteinHit(**r) for r in rows])
        return respond(request, fmt, m, "proteins.html", csv_rows=(p.model_dump() for p in m.proteins),
                       csv_name="proteins.csv", csv_columns=PROTEIN_COLUMNS,
                       context={"page": page, "n_pages": max(1, math.ceil(total / per_page))})

    return handler


router.add_api_route("/proteins", _protein_search(None), methods=["GET"], summary="Protein search (page)", **page_doc())
router.add_api_route("/proteins.json", _protein_search("json"), methods=["GET"],
                     summary="Search proteins by accession, name, organism or Pfam family", **json_doc(M.ProteinSearch))
router.add_api_route("/proteins.csv", _protein_search("csv"), methods=["GET"], summary="Protein search results as CSV",
                     **csv_doc())


def build_protein(reader: AtlasReader, s: dict, accession: str, latent: Optional[int]) -> M.ProteinDetail:
    """The protein page without a live heatmap: ``heatmap`` is None when the atlas stores no vector
    of the chosen latent on this protein (the caller computes it live), and when no latent is chosen."""
    p = reader.protein(accession)
    if p is None:
        raise HTTPException(404, f"no protein {accession!r} in this atlas; search for it by name or family")
    top = reader.protein_top_latents(s["sae_id"], accession)
    if latent is None and top:
        latent = top[0]["latent"]
    heatmap = None
    if latent is not None:
        latent_or_404(s, latent)
        vec = reader.latent_vector(s["sae_id"], accession, latent)
        if vec is not None:
            heatmap = assemble_heatmap(p["sequence"], vec, sae_id=s["sae_id"], latent=latent, source="atlas",
                                       context_free=s["context_free"])
    fams = reader.families(p["families"])
    return M.ProteinDetail(
        atlas_id=reader.atlas_id, accession=p["accession"], label=p["label"], entry_name=p["entry_name"],
        protein_name=p["protein_name"], organism=p["organism"], length=p["length"], sequence=p["sequence"],
        truncated_to=p.get("truncated_to"), locations=p["locations"], families=p["families"],
        family_names={k: v["name"] for k, v in fams.items()}, annotations=[M.Annotation(**a) for a in p["annotations"]],
        structures=[M.Structure(**x) for x in reader.structures(accession)], sae_id=s["sae_id"],
        saes=[x["sae_id"] for x in reader.saes()], top_latents=[M.TopLatent(**t) for t in top], heatmap=heatmap,
    )


def plddt_track(structures: list[M.Structure], length: int) -> list | None:
    """pLDDT per sequence position of the first predicted structure (None where unmapped)."""
    s = next((x for x in structures if x.is_prediction and x.residues.plddt), None)
    if s is None:
        return None
    track: list = [None] * length
    for pos, v in zip(s.residues.seq_pos, s.residues.plddt):
        if 1 <= pos <= length:
            track[pos - 1] = v
    return track


def _protein(fmt_forced: Optional[str]):
    async def handler(request: Request, reader: Reader, s: SAE, engine: Engine, accession: str,
                      latent: Optional[int] = Query(None, ge=0, description="latent shown as a heatmap "
                                                    "(default: the protein's strongest)")):
        fmt = pick_format(request, fmt_forced)
        m = await run_in_threadpool(build_protein, reader, s, accession, latent)
        if m.heatmap is None and (latent is not None or m.top_latents):
            chosen = latent if latent is not None else m.top_latents[0].latent
            m.heatmap = await live_heatmap(request, engine, s["sae_id"], chosen, m.sequence, s["context_free"])
        return await run_in_threadpool(
            respond, request, fmt, m, "protein.html", csv_rows=[t.model_dump() for t in m.top_latents],
            csv_name=f"{accession}_top_latents.csv", csv_columns=list(M.TopLatent.model_fields),
            context={"plddt_track": plddt_track(m.structures, m.length)})

    return handler


# .json/.csv routes first: "{accession}" would otherwise swallow "P12345.json".
router.add_api_route("/proteins/{accession}.json", _protein("json"), methods=["GET"],
                     summary="One protein: sequence, annotations, structures, top latents, a latent's heatmap",
                     **json_doc(M.ProteinDetail, 404, 503))
router.add_api_route("/proteins/{accession}.csv", _protein("csv"), methods=["GET"], summary="A protein's top latents as CSV",
                     **csv_doc(404, 503))
router.add_api_route("/proteins/{accession}", _protein(None), methods=["GET"], summary="One protein (page)",
                     **page_doc(404, 503))
