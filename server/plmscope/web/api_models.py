"""Response and request models: the JSON API contract (published at /openapi.json).

Every page's JSON twin (``PATH.json``) returns one of these models; the HTML page renders the
same object, so what a script reads is exactly what a person sees.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, BeforeValidator, Field

from ..settings import Settings
from .inputs import MAX_LATENTS, SEQUENCE_HELP, json_integer, sequence_type


class SAEInfo(BaseModel):
    sae_id: str
    plm: str
    layer: int
    architecture: str
    d_in: int
    d_sae: int
    k: Optional[int] = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="eval-sae results (explained variance, L0, ...)")
    n_dead: int
    dead_fraction: Optional[float] = None
    n_proteins: int
    n_residues: int
    built_at: Optional[str] = None
    position: int = 0


class LatentRow(BaseModel):
    latent: int
    max_act: float
    mean_act: float
    frac_residues: float
    frac_proteins: float
    n_active_residues: int
    n_active_proteins: int
    is_dead: bool
    top_family: Optional[str] = None
    top_family_name: str = ""
    top_family_frac: Optional[float] = None
    top_annotation_type: Optional[str] = None
    top_annotation_frac: Optional[float] = None
    category: Optional[str] = Field(None, description="activation pattern from `plmscope analyze`")
    analysis_family: Optional[str] = None
    family_f1: Optional[float] = None
    family_specific: Optional[bool] = None
    concept: Optional[str] = None
    concept_f1: Optional[float] = None
    description: Optional[str] = Field(None, description="automatic description (analysis)")


class FacetValue(BaseModel):
    value: str
    label: str = ""
    n: int


class LatentQuery(BaseModel):
    sort: str
    desc: bool
    family: Optional[str] = None
    annotation_type: Optional[str] = None
    category: Optional[str] = None
    concept: Optional[str] = None
    q: Optional[str] = None
    include_dead: bool = False
    page: int
    per_page: int


class Overview(BaseModel):
    atlas_id: str
    atlas_file: str
    meta: dict[str, Any]
    corpus: dict[str, Any]
    saes: list[SAEInfo]
    sae_id: str = Field(description="the SAE whose latents are listed")
    has_analysis: bool
    query: LatentQuery
    total: int = Field(description="latents matching the filters")
    latents: list[LatentRow]
    facets: dict[str, list[FacetValue]]


class Example(BaseModel):
    kind: str = Field(description="'top' or 'bin'")
    bin: Optional[int] = None
    rank: int
    accession: str
    label: str = Field(description="protein name, or its Pfam families and locations when it has none")
    organism: str = ""
    length: int
    sequence: str
    max_act: float
    max_pos: int = Field(description="1-based residue of the maximum")
    n_active: int
    has_structure: bool
    activations: list[float] = Field(description="per residue, row i-1 = residue i")


class BinInfo(BaseModel):
    bin: int
    lo: float
    hi: float
    n_proteins: int
    examples: list[Example]


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]


class AAEnrichment(BaseModel):
    aa: str
    count: int
    frac: float
    background_frac: float
    log2_enrichment: float


class Neighbour(BaseModel):
    rank: int
    latent: int
    cosine: float
    top_family: Optional[str] = None
    frac_proteins: Optional[float] = None
    description: Optional[str] = None


class AAEffect(BaseModel):
    aa: str
    effect: float = Field(description="mean log p_clean(aa) - log p_ablated(aa), nats")


class OutputEffect(BaseModel):
    effect: list[float] = Field(description="20 values in ACDEFGHIKLMNPQRSTVWY order; > 0: the latent promotes the amino acid")
    n_examples: int
    n_positions: int = Field(description="read-out positions averaged over")
    promotes: list[AAEffect]
    suppresses: list[AAEffect]


class LatentDetail(BaseModel):
    atlas_id: str
    sae_id: str
    latent: int
    d_sae: int
    stats: dict[str, Any]
    histogram: Histogram
    aa_enrichment: list[AAEnrichment]
    top_examples: list[Example]
    bins: list[BinInfo]
    families: list[dict[str, Any]]
    annotation_types: list[dict[str, Any]]
    neighbours: list[Neighbour]
    analysis: Optional[dict[str, Any]] = Field(None, description="latent_analysis row, when analysed")
    concepts: list[dict[str, Any]] = Field(default_factory=list, description="latent_concepts rows")
    output_effect: Optional[OutputEffect] = Field(
        None, description="what ablating the latent on its top examples does to the model's output (plmscope analyze)")


class ResidueMap(BaseModel):
    seq_pos: list[int]
    auth_seq_id: list[int]
    ins_code: list[str]
    plddt: Optional[list[Optional[float]]] = None


class Structure(BaseModel):
    structure_id: str
    file_name: str
    chain: str
    format: str
    is_prediction: bool
    identity: float
    coverage: float
    source: str = ""
    content: Optional[str] = Field(None, description="PDB text of the chain (model 1)")
    residues: ResidueMap


class Annotation(BaseModel):
    kind: str
    type: str
    label: str
    name: str = ""
    start: int
    end: int
    score: Optional[float] = None


class TopLatent(BaseModel):
    rank: int
    latent: int
    max_act: float
    max_pos: int
    n_active: int
    frac_proteins: Optional[float] = None
    top_family: Optional[str] = None
    category: Optional[str] = None
    description: Optional[str] = None


class Heatmap(BaseModel):
    """One latent along one sequence; built by ``web.heatmaps.assemble_heatmap``."""

    sae_id: str
    latent: int
    source: str = Field(description="'atlas' (stored vector), 'live' (computed now) or 'none'")
    residues: str = Field("", description="the residues the activations cover, in order (the pLM may have seen "
                          "only the first part of a long protein)")
    activations: Optional[list[float]] = Field(None, description="per residue, item i-1 = residue i")
    max_act: Optional[float] = None
    max_pos: Optional[int] = Field(None, description="1-based residue of the maximum; none when nothing is active")
    scale: Optional[float] = Field(None, description="activation drawn in the darkest colour on the page")
    context_free: int = Field(0, description="leading residues the pLM represents without protein context (UniRep: "
                              "residue 1): left out of every statistic and of max_act / max_pos, drawn greyed")
    message: Optional[str] = None


class ProteinDetail(BaseModel):
    atlas_id: str
    accession: str
    label: str
    entry_name: str
    protein_name: str
    organism: str
    length: int
    sequence: str
    truncated_to: Optional[int] = None
    locations: list[str]
    families: list[str]
    family_names: dict[str, str]
    annotations: list[Annotation]
    structures: list[Structure]
    sae_id: str
    saes: list[str]
    top_latents: list[TopLatent]
    heatmap: Optional[Heatmap] = None


class ProteinHit(BaseModel):
    accession: str
    label: str
    entry_name: str
    protein_name: str
    organism: str
    length: int
    families: list[str]
    locations: list[str]
    has_structure: bool


class ProteinSearch(BaseModel):
    atlas_id: str
    q: str
    total: int
    proteins: list[ProteinHit]


def infer_request_model(settings: Settings) -> type[BaseModel]:
    """The body of POST /api/infer; its sequence limits come from the server's settings."""
    Sequence = sequence_type(settings)

    class InferRequest(BaseModel):
        sequence: Sequence = Field(description=f"{SEQUENCE_HELP}; at most {settings.max_residues} residues")
        sae_id: Optional[str] = Field(None, description="SAE to run; default: the atlas's first SAE")
        latents: list[Annotated[int, Field(ge=0), BeforeValidator(json_integer)]] = Field(
            default_factory=list, max_length=MAX_LATENTS, description="latents to return per-residue heatmaps for")
        top_k: Annotated[int, BeforeValidator(json_integer)] = Field(
            20, ge=1, le=200, description="how many of the strongest latents to list")

    return InferRequest


class InferLatent(BaseModel):
    latent: int
    max_act: float
    max_pos: int = Field(description="1-based residue of the maximum")
    n_active: int = Field(description="residues where the latent is > 0")
    atlas_max_act: Optional[float] = Field(None, description="the latent's maximum over the atlas corpus")
    description: Optional[str] = None


class InferResponse(BaseModel):
    atlas_id: str
    sae_id: str
    record: str = Field(description="FASTA header of the record used, or '' for a bare sequence")
    ignored_records: list[str] = Field(default_factory=list, description="further FASTA records (not run)")
    sequence: str
    length: int
    sequence_sha256: str
    cached: bool
    matched_accession: Optional[str] = Field(None, description="corpus protein with exactly this sequence")
    top_latents: list[InferLatent]
    heatmaps: list[Heatmap]


class Health(BaseModel):
    status: str = Field(description="'ok' when ready, 'degraded' when pages work but live inference does not")
    atlas_open: bool
    atlas_id: Optional[str] = None
    model_loaded: bool
    model_error: Optional[str] = None
    device: Optional[str] = None
    queue_depth: int = 0
    infer_workers: int = Field(0, description="live-inference batches that may compute at once (0 without a model)")
    infer_threads: int = Field(0, description="torch threads shared out between those batches (0 without a model)")


class ErrorBody(BaseModel):
    """Every error the server answers with (4xx and 5xx, validation errors included) when JSON is wanted."""

    status: int = Field(description="the HTTP status, repeated")
    error: str = Field(description="its title, e.g. 'Not found'")
    detail: str = Field(description="what went wrong, for a person to read")


# ---- /analysis.json (documented; the route serialises the reader's dataclasses) ----
class FindingValueModel(BaseModel):
    series: str
    layer: int
    value: Optional[float] = None
    lo: Optional[float] = Field(None, description="95 % interval")
    hi: Optional[float] = None
    k: Optional[int] = Field(None, description="count behind a share (secondary structure: associated latents)")
    n: Optional[int] = Field(None, description="its denominator")
    sae_ids: list[str]


class FindingModel(BaseModel):
    claim: str
    statement: str = Field(description="the paper's claim")
    test: str = Field(description="how it is tested on this atlas")
    metric: str
    verdict: str = Field(description="reproduced | not reproduced | not enough evidence | measured | not tested")
    reason: str = Field(description="the numbers that decided the verdict")
    details: dict[str, Any]
    values: list[FindingValueModel]


class ConceptSourceModel(BaseModel):
    concept: str
    level: str
    sources: dict[str, int] = Field(description="source -> regions in the corpus")
    n_proteins: int
    n_regions: int
    n_val: int
    n_test: int
    scored: bool
    tested: bool
    n_associated_latents: int


class AnalysisDoc(BaseModel):
    """/analysis.json: the findings over all analysed SAEs, then each SAE's analysis (its ``summary``
    as analyze stored it, the probes, concepts with ``concept_sources``, family-specific latents)."""

    has_analysis: bool
    atlas_id: str
    findings: list[FindingModel]
    saes: list[dict[str, Any]]


class PerturbEdit(BaseModel):
    latent: int
    mode: str = Field(description="ablate | clamp | steer")
    value: float = Field(description="clamp: the activation; steer: multiple of the corpus maximum; ablate: 0")
    target: float = Field(description="the activation the latent is set to on the edited residues")
    corpus_max: Optional[float] = Field(None, description="the latent's maximum over the atlas corpus")


class ChangedResidue(BaseModel):
    position: int
    residue: str
    clean_top: str
    steered_top: str


class PerturbResponse(BaseModel):
    atlas_id: str
    sae_id: str
    sequence: str
    length: int
    start: int = Field(description="first edited residue (1-based)")
    end: int = Field(description="last edited residue (inclusive)")
    edits: list[PerturbEdit]
    marginals: str = Field(description="wild-type, masked (ESM-2) or next-amino-acid (UniRep)")
    total_delta_loss: float = Field(description="change of the summed loss over the residues, nats (> 0: worse)")
    mean_delta_loss: float
    delta_logprob: list[float] = Field(description="per residue, change of log p(the residue there)")
    amino_acids: str = Field(description="row order of delta_aa")
    delta_aa: list[list[float]] = Field(description="20 rows (amino_acids) x residues: change of log p(a)")
    clean_top: str = Field(description="most likely amino acid per residue without the intervention")
    steered_sequence: str = Field(description="most likely amino acid per residue with it")
    changed_residues: list[ChangedResidue]


class ScanGrid(BaseModel):
    latent: int
    wild_type: list[float] = Field(description="the latent's wild-type activation at each scanned residue")
    delta: list[list[float]] = Field(description="20 rows (amino_acids) x scanned residues: activation at the "
                                     "mutated residue minus the wild type's (0 on the wild type's own cell)")


class ScanResponse(BaseModel):
    atlas_id: str
    sae_id: str
    sequence: str
    length: int
    start: int
    end: int
    positions: list[int]
    amino_acids: str
    n_variants: int
    grids: list[ScanGrid]
    score_name: Optional[str] = Field(None, description="masked_marginal_log_ratio (ESM-2) or delta_log_likelihood (UniRep)")
    score: Optional[list[list[float]]] = Field(None, description="20 x scanned residues: the model's variant score")
    note: Optional[str] = Field(None, description="set when the window asked for was cut to the server's limit")
