"""The reads of `plmscope analyze` and of the /analysis page, on the reader's helpers.

Every function takes a DuckDB connection: analyze passes its writable copy of the atlas, the web
``AtlasReader.analysis`` its thread's read-only cursor.  The page's results are dataclasses; their
``dataclasses.asdict`` is the JSON of ``/analysis.json`` (the route adds only URLs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from .reader import query_one, query_rows, read_saes
from .schema import ANALYSIS_TABLES, LATER_ANALYSIS_TABLES

# What analyze needs beyond the analysis tables it rewrites (families, structures and embeddings
# are optional: an atlas built without them is analysed without them).
ANALYZE_INPUT_TABLES = ("atlas_meta", "saes", "proteins", "annotations", "latents", "latent_examples",
                        "protein_latent_stats", "residue_codes")
CONCEPT_LIMIT = 60  # concepts listed per SAE on the page, most latents first
FAMILY_SPECIFIC_LIMIT = 30


# ---------------------------------------------------------------- the /analysis page
@dataclass
class PatternCount:
    pattern: str
    n: int


@dataclass
class ProbeScore:
    """One probe fit, or the majority-class baseline (``source`` 'majority', no pooling or C)."""

    task: str
    features: str  # '<source>_<pooling>' | 'majority'
    source: str  # 'sae' | 'raw' | 'majority'
    pooling: str | None  # 'mean' | 'mean_max'
    accuracy: float
    accuracy_lo: float  # 95 % bootstrap interval over test clusters
    accuracy_hi: float
    macro_f1: float
    n_train: int
    n_test: int
    n_features: int
    c: float | None  # chosen by CV on the training rows
    cv_accuracy: float | None
    classes: list[str]


@dataclass
class ProbeComparison:
    """SAE vs raw probe at the same pooling, on the same test proteins."""

    task: str
    pooling: str
    sae_accuracy: float
    raw_accuracy: float
    diff: float  # SAE - raw
    diff_lo: float  # 95 % paired bootstrap interval
    diff_hi: float
    n_sae_only: int  # discordant test proteins: only the SAE probe right
    n_raw_only: int
    mcnemar_p: float


@dataclass
class ProbeLatent:
    """A top-weighted latent of an SAE probe with its evidence: the probe's own (weight, activity
    on the class's test proteins vs the others') and the atlas's (density, analysis)."""

    rank: int
    latent: int
    pooling: str  # 'mean' | 'max'
    weight: float
    frac_class: float | None  # share of the class's test proteins it is active on
    frac_rest: float | None  # share of the other classes' test proteins
    density: float | None  # share of all atlas proteins it is active on (latents.frac_proteins)
    pattern: str | None
    family: str | None
    family_specific: bool | None
    concept: str | None
    description: str | None


@dataclass
class ClassLatents:
    """The latents with the largest positive and negative probe weights for one class."""

    positive: list[ProbeLatent] = field(default_factory=list)
    negative: list[ProbeLatent] = field(default_factory=list)


@dataclass
class ConceptCoverage:
    """A concept with at least one associated latent (InterPLM's rule)."""

    concept: str
    level: str  # 'region' | 'residue': what n_val / n_test count
    n_latents: int  # latents associated with the concept
    n_val: int
    n_test: int
    best_latent: int  # the associated latent with the highest validation F1 (never test F1)
    best_val_f1: float
    best_test_f1: float  # of that latent
    best_test_f1_lo: float | None  # bootstrap 95 % interval
    best_test_f1_hi: float | None


@dataclass
class ConceptPair:
    """One latent_concepts row: a reported (latent, concept) pair, for the latent page's evidence."""

    concept: str
    level: str
    associated: bool
    threshold: float  # fraction of norm_max, chosen on validation
    norm_max: float
    val_precision: float
    val_recall: float
    val_f1: float
    test_precision: float
    test_recall: float
    test_f1: float
    test_f1_lo: float | None
    test_f1_hi: float | None
    n_val: int
    n_test: int


@dataclass
class FamilySpecificLatent:
    latent: int
    family: str | None
    family_f1: float | None
    family_precision: float | None
    family_auc: float | None
    description: str | None


@dataclass
class ConceptSource:
    """A concept of the corpus: where it comes from and how much of it the association saw."""

    concept: str
    level: str  # 'region' | 'residue'
    sources: dict[str, int]  # source -> regions in the corpus
    n_proteins: int
    n_regions: int
    n_val: int  # regions (residue-level: residues) among the validation proteins
    n_test: int
    scored: bool
    tested: bool  # >= 10 in each split
    n_associated_latents: int


@dataclass
class FindingValue:
    series: str
    layer: int
    value: float | None
    lo: float | None  # 95 % interval
    hi: float | None
    k: int | None
    n: int | None
    sae_ids: list[str]


@dataclass
class Finding:
    """One of the paper's claims as tested on this atlas (analysis/findings.py)."""

    claim: str
    statement: str
    test: str
    metric: str
    verdict: str  # 'reproduced' | 'not reproduced' | 'not enough evidence' | 'measured' | 'not tested'
    reason: str
    details: dict[str, Any]
    values: list[FindingValue] = field(default_factory=list)


@dataclass(kw_only=True)
class SaeHeader:
    """An SAE of the atlas that analyze has not analysed."""

    sae_id: str
    plm: str
    layer: int
    d_sae: int
    architecture: str
    k: int | None
    analyzed: bool = field(default=False, init=False)


@dataclass(kw_only=True)
class SaeAnalysis(SaeHeader):
    analyzed: bool = field(default=True, init=False)
    # analyze's own JSON summary (family, patterns, concepts, probes, timing_s), shown as stored.
    summary: dict[str, Any]
    patterns: list[PatternCount]
    probes: list[ProbeScore]
    probe_comparisons: list[ProbeComparison]
    # '<task>:<features>' (each SAE fit, e.g. 'location:sae_mean_max') -> class -> latents
    probe_latents: dict[str, dict[str, ClassLatents]]
    concepts: list[ConceptCoverage]
    family_specific: list[FamilySpecificLatent]
    concept_sources: list[ConceptSource]  # empty in an atlas analysed before they were recorded


@dataclass
class AnalysisPage:
    has_analysis: bool
    saes: list[SaeHeader | SaeAnalysis]
    atlas_id: str
    findings: list[Finding] = field(default_factory=list)  # the paper's claims tested, over all analysed SAEs


def analysis_page(con, atlas_id: str, tables: set[str]) -> AnalysisPage:
    if not set(ANALYSIS_TABLES) <= tables:
        return AnalysisPage(has_analysis=False, saes=[], atlas_id=atlas_id)
    later = set(LATER_ANALYSIS_TABLES) <= tables
    saes = [_sae_analysis(con, s, later) for s in read_saes(con)]
    return AnalysisPage(has_analysis=any(s.analyzed for s in saes), saes=saes, atlas_id=atlas_id,
                        findings=findings(con) if later else [])


def findings(con) -> list[Finding]:
    out = [Finding(**{**r, "details": json.loads(r["details"])}) for r in query_rows(
        con, "SELECT claim, statement, test, metric, verdict, reason, details FROM findings ORDER BY position")]
    by_claim = {f.claim: f for f in out}
    for r in query_rows(con, "SELECT claim, series, layer, value, lo, hi, k, n, sae_ids FROM finding_values "
                             "ORDER BY claim, series, layer"):
        by_claim[r.pop("claim")].values.append(FindingValue(**r))
    return out


def _concept_sources(con, sid: str) -> list[ConceptSource]:
    rows = query_rows(
        con, "SELECT concept, level, sources, n_proteins, n_regions, n_val, n_test, scored, tested, n_associated_latents "
        "FROM concept_sources WHERE sae_id = ? ORDER BY n_associated_latents DESC, tested DESC, n_regions DESC, concept",
        [sid])
    return [ConceptSource(**{**r, "sources": json.loads(r["sources"])}) for r in rows]


def _sae_analysis(con, sae: dict, later: bool = True) -> SaeHeader:
    head = {k: sae[k] for k in ("sae_id", "plm", "layer", "d_sae", "architecture", "k")}
    sid = sae["sae_id"]
    row = query_one(con, "SELECT summary FROM analysis_summary WHERE sae_id = ?", [sid])
    if row is None:
        return SaeHeader(**head)
    patterns = query_rows(
        con, "SELECT pattern, count(*) AS n FROM latent_analysis WHERE sae_id = ? GROUP BY pattern ORDER BY n DESC", [sid])
    probes = query_rows(
        con, "SELECT task, features, source, pooling, accuracy, accuracy_lo, accuracy_hi, macro_f1, n_train, n_test, "
        "n_features, c, cv_accuracy, classes FROM probe_results WHERE sae_id = ? "
        "ORDER BY task, pooling NULLS LAST, source DESC", [sid])
    comparisons = query_rows(
        con, "SELECT task, pooling, sae_accuracy, raw_accuracy, diff, diff_lo, diff_hi, n_sae_only, n_raw_only, "
        "mcnemar_p FROM probe_comparisons WHERE sae_id = ? ORDER BY task, pooling", [sid])
    # the best latent of a concept is chosen by validation F1 (ties: lowest latent); its test numbers ride along
    concepts = query_rows(
        con, "SELECT concept, any_value(level) AS level, count(*) AS n_latents, any_value(n_val) AS n_val, "
        "any_value(n_test) AS n_test, arg_max(latent, (val_f1, -latent)) AS best_latent, max(val_f1) AS best_val_f1, "
        "arg_max(test_f1, (val_f1, -latent)) AS best_test_f1, arg_max(test_f1_lo, (val_f1, -latent)) AS best_test_f1_lo, "
        "arg_max(test_f1_hi, (val_f1, -latent)) AS best_test_f1_hi "
        "FROM latent_concepts WHERE sae_id = ? AND associated "
        "GROUP BY concept ORDER BY n_latents DESC, best_val_f1 DESC, concept LIMIT ?", [sid, CONCEPT_LIMIT])
    specific = query_rows(
        con, "SELECT latent, family, family_f1, family_precision, family_auc, description FROM latent_analysis "
        "WHERE sae_id = ? AND family_specific ORDER BY family_f1 DESC, latent LIMIT ?", [sid, FAMILY_SPECIFIC_LIMIT])
    return SaeAnalysis(
        **head,
        summary=json.loads(row["summary"]),
        patterns=[PatternCount(**r) for r in patterns],
        probes=[ProbeScore(**r) for r in probes],
        probe_comparisons=[ProbeComparison(**r) for r in comparisons],
        probe_latents=_probe_latents(con, sid),
        concepts=[ConceptCoverage(**r) for r in concepts],
        family_specific=[FamilySpecificLatent(**r) for r in specific],
        concept_sources=_concept_sources(con, sid) if later else [],
    )


def latent_concepts(con, sae_id: str, latent: int, limit: int = 50) -> list[ConceptPair]:
    """A latent's reported concept pairs: associated first, then by validation F1 (never test F1)."""
    rows = query_rows(
        con, "SELECT concept, level, associated, threshold, norm_max, val_precision, val_recall, val_f1, test_precision, "
        "test_recall, test_f1, test_f1_lo, test_f1_hi, n_val, n_test FROM latent_concepts "
        "WHERE sae_id = ? AND latent = ? ORDER BY associated DESC, val_f1 DESC, concept LIMIT ?", [sae_id, latent, limit])
    return [ConceptPair(**r) for r in rows]


def _probe_latents(con, sae_id: str) -> dict[str, dict[str, ClassLatents]]:
    rows = query_rows(
        con, "SELECT p.task || ':' || p.features AS fit, p.class, p.sign, p.rank, p.latent, p.pooling, p.weight, "
        "p.frac_class, p.frac_rest, l.frac_proteins AS density, a.pattern, a.family, a.family_specific, a.concept, "
        "a.description FROM probe_latents p "
        "LEFT JOIN latent_analysis a ON a.sae_id = p.sae_id AND a.latent = p.latent "
        "LEFT JOIN latents l ON l.sae_id = p.sae_id AND l.latent = p.latent "
        "WHERE p.sae_id = ? ORDER BY p.task, p.features DESC, p.class, p.sign DESC, p.rank", [sae_id])
    out: dict[str, dict[str, ClassLatents]] = {}
    for r in rows:
        by_sign = out.setdefault(r.pop("fit"), {}).setdefault(r.pop("class"), ClassLatents())
        getattr(by_sign, r.pop("sign")).append(ProbeLatent(**r))
    return out


# ---------------------------------------------------------------- analyze's inputs
@dataclass
class LatentStats:
    """Per-latent arrays of one SAE, indexed by latent number."""

    max_act: np.ndarray  # float32
    is_dead: np.ndarray  # bool
    n_active_proteins: np.ndarray  # int64
    aa_counts: np.ndarray  # (d_sae, 20) int64, in schema.AMINO_ACIDS order


def latent_stats(con, sae_id: str, d_sae: int) -> LatentStats:
    # A latent without a row counts as dead.
    out = LatentStats(np.zeros(d_sae, np.float32), np.ones(d_sae, bool), np.zeros(d_sae, np.int64),
                      np.zeros((d_sae, 20), np.int64))
    rows = con.execute(
        "SELECT latent, max_act, is_dead, n_active_proteins, aa_counts FROM latents WHERE sae_id = ?", [sae_id]
    ).fetchall()
    for lat, mx, dead, nap, aa in rows:
        out.max_act[lat], out.is_dead[lat], out.n_active_proteins[lat], out.aa_counts[lat] = mx, dead, nap, aa
    return out


def aa_background(con, sae_id: str) -> np.ndarray:
    return np.asarray(query_one(con, "SELECT aa_background FROM saes WHERE sae_id = ?", [sae_id])["aa_background"])


def proteins(con) -> list[dict]:
    return query_rows(con, "SELECT accession, length, sequence, locations, families, truncated_to FROM proteins ORDER BY accession")


def annotations(con) -> list[dict]:
    return query_rows(con, 'SELECT accession, kind, type, label, start, "end" FROM annotations')


def family_names(con) -> dict[str, str]:
    return dict(con.execute("SELECT family, name FROM families").fetchall())


def protein_latent_stats(con, sae_id: str) -> dict[str, np.ndarray]:
    """accession (object), latent, max_act, sum_act of every active protein x latent pair."""
    return con.execute(
        "SELECT accession, latent, max_act, sum_act FROM protein_latent_stats WHERE sae_id = ?", [sae_id]
    ).fetchnumpy()


def residue_codes(con, sae_id: str, d_sae: int, accessions: list[str]) -> dict[str, sparse.csr_matrix]:
    """Per accession of ``accessions`` whose codes the build kept: its residues x latents codes
    (context-free positions left out; float32 of the stored float16/float32 values)."""
    if not accessions:
        return {}
    rows = con.execute(
        "SELECT accession, n_rows, row_counts, latents, activations, value_type FROM residue_codes "
        "WHERE sae_id = ? AND accession IN (SELECT unnest(?::VARCHAR[]))", [sae_id, list(accessions)]).fetchall()
    index = np.uint16 if d_sae <= np.iinfo(np.uint16).max else np.uint32
    out = {}
    for acc, n, counts, lat, val, kind in rows:
        indptr = np.concatenate([[0], np.cumsum(np.frombuffer(counts, dtype=index), dtype=np.int64)])
        out[acc] = sparse.csr_matrix((np.frombuffer(val, dtype=kind).astype(np.float32),
                                      np.frombuffer(lat, dtype=index).astype(np.int32), indptr), shape=(n, d_sae))
    return out


def embeddings(con, sae_id: str) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """Accessions, mean and max raw pLM representations (rows in accession order), or ([], None, None)."""
    rows = con.execute("SELECT accession, mean_rep, max_rep FROM protein_embeddings WHERE sae_id = ? ORDER BY accession",
                       [sae_id]).fetchall()
    if not rows:
        return [], None, None
    return ([r[0] for r in rows], np.asarray([r[1] for r in rows], dtype=np.float32),
            np.asarray([r[2] for r in rows], dtype=np.float32))


def top_examples(con, sae_id: str, per_latent: int) -> list[tuple[int, bytes]]:
    """(latent, uint8 activations) of each latent's strongest ``per_latent`` examples."""
    rows = con.execute(
        "SELECT latent, activations FROM latent_examples WHERE sae_id = ? AND kind = 'top' AND rank < ? ORDER BY latent, rank",
        [sae_id, per_latent],
    ).fetchall()
    return [(int(lat), bytes(blob)) for lat, blob in rows]


def top_example_proteins(con, sae_id: str, per_latent: int) -> list[tuple[int, str, str, bytes]]:
    """(latent, accession, sequence, uint8 activations) of each latent's strongest ``per_latent`` examples."""
    rows = con.execute(
        "SELECT e.latent, e.accession, p.sequence, e.activations FROM latent_examples e "
        "JOIN proteins p ON p.accession = e.accession "
        "WHERE e.sae_id = ? AND e.kind = 'top' AND e.rank < ? ORDER BY e.latent, e.rank",
        [sae_id, per_latent],
    ).fetchall()
    return [(int(lat), acc, seq, bytes(blob)) for lat, acc, seq, blob in rows]


def associated_pairs(con, sae_id: str) -> list[tuple[int, str, float]]:
    """(latent, concept, test F1) of every associated latent-concept pair."""
    rows = con.execute("SELECT latent, concept, test_f1 FROM latent_concepts WHERE sae_id = ? AND associated "
                       "ORDER BY test_f1 DESC", [sae_id]).fetchall()
    return [(int(a), str(b), float(c)) for a, b, c in rows]


def latent_densities(con, sae_id: str) -> dict[int, float]:
    """Each latent's share of corpus residues it is active on (``latents.frac_residues``)."""
    return {int(a): float(b) for a, b in con.execute(
        "SELECT latent, frac_residues FROM latents WHERE sae_id = ?", [sae_id]).fetchall()}


def latent_output_effect(con, sae_id: str, latent: int) -> dict | None:
    """The latent's output-effect row (``effect``: 20 values in AMINO_ACIDS order), or None."""
    row = con.execute("SELECT effect, n_examples, n_positions FROM latent_output_effects WHERE sae_id = ? AND latent = ?",
                      [sae_id, latent]).fetchone()
    if row is None:
        return None
    return {"effect": [float(v) for v in row[0]], "n_examples": int(row[1]), "n_positions": int(row[2])}


def structures_for_secondary(con) -> list[dict]:
    """Best structure per protein (highest coverage, then identity) with its residue map."""
    rows = query_rows(
        con,
        "SELECT structure_id, accession, content FROM ("
        "  SELECT *, row_number() OVER (PARTITION BY accession ORDER BY coverage DESC, identity DESC, structure_id) AS r"
        "  FROM structures) WHERE r = 1 ORDER BY accession",
    )
    for row in rows:
        res = con.execute(
            "SELECT auth_seq_id, ins_code, seq_pos FROM structure_residues WHERE structure_id = ?", [row["structure_id"]]
        ).fetchall()
        row["residue_map"] = {(int(a), (i or "").strip()): int(p) for a, i, p in res}
    return rows


# ---------------------------------------------------------------- the findings' inputs
def analysed_saes(con) -> list[dict]:
    """Every analysed SAE: sae_id, plm, layer and its analyze summary (parsed)."""
    rows = query_rows(con, "SELECT s.sae_id, s.plm, s.layer, a.summary FROM saes s "
                           "JOIN analysis_summary a ON a.sae_id = s.sae_id ORDER BY s.layer, s.sae_id")
    for r in rows:
        r["summary"] = json.loads(r["summary"])
    return rows


def pattern_count(con, sae_id: str, pattern: str) -> int:
    return int(query_one(con, "SELECT count(*) AS n FROM latent_analysis WHERE sae_id = ? AND pattern = ?",
                         [sae_id, pattern])["n"])


def probe_class_peaks(con, sae_id: str, cls: str, features: str, kind: str, per_latent: int) -> dict:
    """The top positive latents of one class of an SAE probe fit, and the peak residue (max_pos) of
    each of their ``per_latent`` strongest top examples: how many fall inside an annotation of ``kind``."""
    return query_one(
        con, "WITH lat AS (SELECT DISTINCT latent FROM probe_latents WHERE sae_id = ? AND task = 'location' AND "
        "class = ? AND sign = 'positive' AND features = ?), "
        "peaks AS (SELECT e.accession, e.max_pos FROM latent_examples e JOIN lat USING (latent) "
        "WHERE e.sae_id = ? AND e.kind = 'top' AND e.rank < ?) "
        "SELECT (SELECT count(*) FROM lat) AS n_latents, count(*) AS n_peaks, "
        "count(*) FILTER (WHERE EXISTS (SELECT 1 FROM annotations a WHERE a.kind = ? AND a.accession = peaks.accession "
        "AND peaks.max_pos BETWEEN a.start AND a.\"end\")) AS n_hits FROM peaks",
        [sae_id, cls, features, sae_id, per_latent, kind])


def annotation_base_rate(con, kind: str) -> tuple[int, int]:
    """(residues inside an annotation of ``kind``, overlaps counted once; all residues the pLM saw)."""
    hits = query_one(
        con, "SELECT count(*) AS n FROM (SELECT DISTINCT a.accession, r.pos FROM annotations a "
        "JOIN proteins p ON p.accession = a.accession, "
        "LATERAL (SELECT unnest(range(a.start, least(a.\"end\", coalesce(p.truncated_to, p.length)) + 1)) AS pos) r "
        "WHERE a.kind = ?)", [kind])["n"]
    total = query_one(con, "SELECT coalesce(sum(coalesce(truncated_to, length)), 0) AS n FROM proteins")["n"]
    return int(hits), int(total)


def concept_best(con, sae_id: str, prefix: str) -> list[dict]:
    """Per concept starting with ``prefix`` (every one analyze scored, from ``concept_sources``): the
    test F1 (and interval) of the reported latent with the best validation F1 (NULL when no latent
    was reported: none reached the reporting floor on validation), the number of associated
    latents, and whether the concept was tested."""
    return query_rows(
        con, "SELECT s.concept, arg_max(c.test_f1, (c.val_f1, -c.latent)) AS test_f1, "
        "arg_max(c.test_f1_lo, (c.val_f1, -c.latent)) AS lo, arg_max(c.test_f1_hi, (c.val_f1, -c.latent)) AS hi, "
        "count(c.latent) FILTER (WHERE c.associated) AS n_associated, any_value(s.tested) AS tested "
        "FROM concept_sources s LEFT JOIN latent_concepts c ON c.sae_id = s.sae_id AND c.concept = s.concept "
        "WHERE s.sae_id = ? AND starts_with(s.concept, ?) AND s.scored GROUP BY s.concept ORDER BY s.concept",
        [sae_id, prefix])
