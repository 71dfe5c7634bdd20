"""All SQL that reads an atlas.

The web app, ``plmscope view``, ``plmscope build`` (adding to an atlas) and ``plmscope analyze``
read through this module and ``analysis_reads`` (which builds on its helpers) only.  An
``AtlasReader`` opens the file read-only (a served atlas can never be modified by a request, and
several processes may serve one file); every query is parameterised.  DuckDB connections are not
safe to share between threads, so each thread gets its own cursor of the one database connection.
The file cannot change while it is open read-only, so what every page needs and no request
changes -- the SAE rows and which tables hold rows -- is read once at open, not once per request
(a DuckDB query costs 0.2-1 ms even when it reads one row; ``scripts/bench_server.py``).
The module-level queries take a connection instead, so that analyze runs the same queries on its
writable copy of the atlas.

Page results are plain dicts (JSON-ready: floats, ints, strings, lists), so the web layer can wrap
them in its pydantic models without knowing SQL or the storage encoding; the /analysis page's are
dataclasses (``analysis_reads``).  Per-residue activations are decoded here from ``uint8`` to
floats (``q / 255 * latents.max_act``).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AtlasError
from ..vocab import AMINO_ACIDS, aa_fold, dequantize
from .schema import SCHEMA_VERSION, TABLES

if TYPE_CHECKING:
    from .analysis_reads import AnalysisPage

# The latent table's default order, "evidence": what a reader should look at first.  Tiers, high first:
#   4  associated with a concept by InterPLM's rule (latent_analysis.concept)
#   3  family-specific on held-out proteins
#   2  a localised activation pattern (point, short or long motif, periodic) or an amino-acid
#      enrichment in its description
#   1  the rest
#   0  dense or artefact: active on >= DENSE_PROTEINS of the proteins, or firing on whole proteins
#      (without a concept or family association, which keep their tier)
# and within a tier by the F1 of that evidence (concept test F1, else family held-out F1).  Before
# `plmscope analyze` every latent is tier 1 or 0.
DENSE_PROTEINS = 0.5
EVIDENCE_ORDER = (
    "(CASE WHEN a.concept IS NOT NULL THEN 4 WHEN a.family_specific THEN 3 "
    f"WHEN l.frac_proteins >= {DENSE_PROTEINS} OR a.pattern = 'whole' THEN 0 "
    "WHEN a.pattern IN ('point', 'short_motif', 'long_motif', 'periodic') OR a.description LIKE '%enriched %' THEN 2 "
    "ELSE 1 END) * 10 + coalesce(a.concept_f1, a.family_f1, 0)"
)
DEFAULT_SORT = "evidence"

# Sort keys of the latent table -> SQL expression (a whitelist: user input never reaches SQL text).
LATENT_SORTS: dict[str, str] = {
    "evidence": EVIDENCE_ORDER,
    "latent": "l.latent",
    "max_act": "l.max_act",
    "mean_act": "l.mean_act",
    "frac_residues": "l.frac_residues",
    "frac_proteins": "l.frac_proteins",
    "n_active_proteins": "l.n_active_proteins",
    "top_family_frac": "l.top_family_frac",
    "family_f1": "a.family_f1",
    "concept_f1": "a.concept_f1",
}

# Tables a reader needs; the analysis tables may be empty (before `plmscope analyze`).
REQUIRED_TABLES = ("atlas_meta", "saes", "proteins", "latents", "latent_examples")


def decode_activations(blob: bytes | None, scale: float) -> list[float]:
    """uint8 BLOB -> per-residue floats, rounded to 4 decimals (the quantisation step is coarser)."""
    if not blob:
        return []
    return np.round(dequantize(np.frombuffer(bytes(blob), dtype=np.uint8), scale), 4).tolist()


def protein_label(p: dict) -> str:
    """A name for every protein: its name, else its Pfam families and location classes.

    Most demo proteins have no name in their source; an accession alone tells a scientist nothing.
    """
    name = p.get("protein_name") or p.get("entry_name") or ""
    if name:
        return name
    parts = []
    if p.get("families"):
        parts.append(", ".join(p["families"][:3]) + (" …" if len(p["families"]) > 3 else ""))
    if p.get("locations"):
        parts.append(", ".join(p["locations"][:2]))
    return " · ".join(parts) if parts else "unnamed protein"


def _num(x: Any) -> Any:
    # NaN/inf are not JSON; a missing metric is None.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def query_rows(con, sql: str, params: list | tuple = ()) -> list[dict]:
    """Rows of ``sql`` as dicts, NaN and inf as None."""
    res = con.execute(sql, list(params))
    cols = [d[0] for d in res.description]
    # fetchall, never a partial read: DuckDB refuses the next statement while a result is half read.
    return [{c: _num(v) for c, v in zip(cols, row)} for row in res.fetchall()]


def query_one(con, sql: str, params: list | tuple = ()) -> dict | None:
    rows = query_rows(con, sql, params)
    return rows[0] if rows else None


def connect(path: str | Path, *, read_only: bool = True, display: str | Path | None = None):
    """A DuckDB connection on an atlas file; a file DuckDB cannot open is the user's error."""
    import duckdb

    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as exc:
        raise AtlasError(f"{display or path} is not a readable DuckDB atlas: {exc}") from None


def check_atlas(con, path: str | Path, required: tuple[str, ...] = REQUIRED_TABLES) -> tuple[set[str], dict[str, Any]]:
    """The atlas's tables and ``atlas_meta``, once it has the ``required`` tables and this schema version.

    Every open of an atlas (serving, analyze, a build adding to it) goes through this one check.
    """
    tables = {r["table_name"] for r in query_rows(con, "SELECT table_name FROM information_schema.tables")}
    missing = [t for t in required if t not in tables]
    if missing:
        raise AtlasError(f"{path} is not a plmscope atlas: tables {', '.join(missing)} are missing")
    meta = {r["key"]: json.loads(r["value"]) for r in query_rows(con, "SELECT key, value FROM atlas_meta")}
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise AtlasError(
            f"{path} has atlas schema version {version}; this plmscope reads version {SCHEMA_VERSION} "
            f"(rebuild the atlas with this version's `plmscope build`)"
        )
    return tables & set(TABLES), meta


def read_saes(con) -> list[dict]:
    """The atlas's SAEs in build order, ``cfg`` and ``metrics`` parsed."""
    rows = query_rows(
        con,
        "SELECT sae_id, plm, layer, architecture, d_in, d_sae, k, cfg, metrics, n_dead, n_proteins, "
        "n_residues, context_free, CAST(built_at AS VARCHAR) AS built_at, position FROM saes ORDER BY position, sae_id",
    )
    for r in rows:
        r["cfg"] = json.loads(r["cfg"]) if r["cfg"] else {}
        r["metrics"] = json.loads(r["metrics"]) if r["metrics"] else {}
        r["dead_fraction"] = r["n_dead"] / r["d_sae"] if r["d_sae"] else None
    return rows


def read_sae_weights(con, sae_id: str, path: str | Path) -> tuple[dict, bytes]:
    """(cfg, safetensors bytes) of one SAE, as ``sae.io.sae_from_bytes`` takes them."""
    rows = con.execute("SELECT cfg, weights FROM saes WHERE sae_id = ?", [sae_id]).fetchall()
    if not rows:
        raise AtlasError(f"{path} holds no SAE {sae_id!r}")
    return json.loads(rows[0][0]), bytes(rows[0][1])


def read_existing_meta(path: str | Path) -> dict[str, Any]:
    """atlas_meta and SAE ids (``_sae_ids``) of an existing atlas, for checks before a build adds to it."""
    con = connect(path)
    try:
        _, meta = check_atlas(con, path, required=("atlas_meta", "saes"))
        meta["_sae_ids"] = [s["sae_id"] for s in read_saes(con)]
    finally:
        con.close()
    return meta


class AtlasReader:
    """A read-only view of one atlas file.

    ``threads``: DuckDB's worker threads for this file, 0 = leave DuckDB's default (one per core).
    It is a setting of the file's database in this process (DuckDB refuses a second connection to
    one file with another configuration), so it is SET after connecting, not passed to connect.
    """

    def __init__(self, path: str | Path, threads: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise AtlasError(f"atlas file {self.path} does not exist (build one with `plmscope build`)")
        self._con = connect(self.path)
        if threads:
            self._con.execute(f"SET threads = {int(threads)}")
        self._local = threading.local()
        try:
            self._tables, self.meta = check_atlas(self._con, self.path)
        except AtlasError:
            self._con.close()
            raise
        self.atlas_id = str(self.meta.get("atlas_id", ""))
        self._seq_index: dict[str, str] | None = None
        self._briefs: dict[str, dict[int, dict]] = {}  # latent_briefs, per SAE on first use
        self._briefs_lock = threading.Lock()
        cur = self._cur()
        self._filled = {t for t in self._tables
                        if cur.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0]}  # noqa: S608 (table from schema)
        self._saes = read_saes(cur)
        self._sae_extra = {r["sae_id"]: r for r in query_rows(cur, "SELECT sae_id, hist_edges, aa_background FROM saes")}

    # ---- plumbing ----
    def _cur(self):
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._local.cur = self._con.cursor()
        return cur

    def _rows(self, sql: str, params: list | tuple = ()) -> list[dict]:
        return query_rows(self._cur(), sql, params)

    def _one(self, sql: str, params: list | tuple = ()) -> dict | None:
        return query_one(self._cur(), sql, params)

    def has_rows(self, table: str) -> bool:
        return table in self._filled

    def close(self) -> None:
        self._con.close()

    # ---- overview ----
    def saes(self) -> list[dict]:
        """The atlas's SAEs (read at open; each call returns fresh dicts, so callers may edit them)."""
        return [dict(s) for s in self._saes]

    def sae(self, sae_id: str) -> dict | None:
        return next((s for s in self.saes() if s["sae_id"] == sae_id), None)

    def sae_weights(self, sae_id: str) -> tuple[dict, bytes]:
        return read_sae_weights(self._cur(), sae_id, self.path)

    def overview(self) -> dict:
        counts = self._one(
            "SELECT (SELECT count(*) FROM proteins) AS n_proteins, "
            "(SELECT coalesce(sum(length), 0) FROM proteins) AS n_residues, "
            "(SELECT count(*) FROM proteins WHERE has_structure) AS n_with_structure, "
            "(SELECT count(*) FROM families) AS n_families"
        )
        return {
            "atlas_id": self.atlas_id,
            "path": self.path.name,
            "meta": {k: v for k, v in self.meta.items() if k != "inputs"},
            "saes": [{k: v for k, v in s.items() if k != "cfg"} for s in self.saes()],
            "corpus": counts,
            "has_analysis": self.has_rows("latent_analysis"),
        }

    def analysis(self) -> AnalysisPage:
        """Everything the /analysis page shows: per SAE, what `plmscope analyze` found."""
        # analysis_reads builds on this module's helpers, so it can only be imported once they exist.
        from .analysis_reads import analysis_page

        return analysis_page(self._cur(), self.atlas_id, self._tables)

    # ---- latent table ----
    def latent_facets(self, sae_id: str) -> dict:
        """Values offered by the latent table's filters, most common first."""
        fam = self._rows(
            "SELECT f.family, coalesce(n.name, '') AS name, count(*) AS n FROM latent_families f "
            "LEFT JOIN families n ON n.family = f.family WHERE f.sae_id = ? GROUP BY ALL ORDER BY n DESC, f.family LIMIT 300",
            [sae_id],
        )
        types = self._rows(
            "SELECT type, count(*) AS n FROM latent_annotation_types WHERE sae_id = ? GROUP BY type ORDER BY n DESC, type",
            [sae_id],
        )
        cats = self._rows(
            "SELECT pattern AS category, count(*) AS n FROM latent_analysis WHERE sae_id = ? GROUP BY pattern ORDER BY n DESC",
            [sae_id],
        )
        concepts = self._rows(
            "SELECT concept, count(*) AS n FROM latent_concepts WHERE sae_id = ? AND associated "
            "GROUP BY concept ORDER BY n DESC, concept LIMIT 300",
            [sae_id],
        )
        return {"families": fam, "annotation_types": types, "categories": cats, "concepts": concepts}

    def latent_list(
        self,
        sae_id: str,
        *,
        sort: str = DEFAULT_SORT,
        desc: bool = True,
        family: str | None = None,
        annotation_type: str | None = None,
        category: str | None = None,
        concept: str | None = None,
        q: str | None = None,
        include_dead: bool = False,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[dict], int]:
        """One page of the latent table and the number of latents matching the filters."""
        if sort not in LATENT_SORTS:
            raise ValueError(f"unknown sort {sort!r}; use one of {', '.join(LATENT_SORTS)}")
        where, params = ["l.sae_id = ?"], [sae_id]
        if not include_dead:
            where.append("NOT l.is_dead")
        if family:
            where.append(
                "(a.family = ? OR l.top_family = ? OR EXISTS (SELECT 1 FROM latent_families f "
                "WHERE f.sae_id = l.sae_id AND f.latent = l.latent AND f.family = ?))"
            )
            params += [family] * 3
        if annotation_type:
            where.append(
                "(l.top_annotation_type = ? OR EXISTS (SELECT 1 FROM latent_annotation_types t "
                "WHERE t.sae_id = l.sae_id AND t.latent = l.latent AND t.type = ?))"
            )
            params += [annotation_type] * 2
        if category:
            where.append("a.pattern = ?")
            params.append(category)
        if concept:
            where.append(
                "(a.concept = ? OR EXISTS (SELECT 1 FROM latent_concepts c WHERE c.sae_id = l.sae_id "
                "AND c.latent = l.latent AND c.concept = ? AND c.associated))"
            )
            params += [concept] * 2
        if q and q.strip():
            text = q.strip()
            like = f"%{text}%"
            clause = (
                "(a.description ILIKE ? OR a.family ILIKE ? OR a.concept ILIKE ? OR l.top_family ILIKE ? "
                "OR l.top_annotation_type ILIKE ? OR fam.name ILIKE ? OR EXISTS (SELECT 1 FROM latent_families f "
                "JOIN families n ON n.family = f.family WHERE f.sae_id = l.sae_id AND f.latent = l.latent "
                "AND (n.name ILIKE ? OR n.description ILIKE ?)) OR EXISTS (SELECT 1 FROM latent_annotation_types t "
                "WHERE t.sae_id = l.sae_id AND t.latent = l.latent AND t.type ILIKE ?)"
            )
            params += [like] * 9
            if text.isdigit():
                clause += " OR l.latent = ?"
                params.append(int(text))
            where.append(clause + ")")
        direction = "DESC" if desc else "ASC"
        sql = (
            "SELECT l.latent, l.max_act, l.mean_act, l.frac_residues, l.frac_proteins, l.n_active_residues, "
            "l.n_active_proteins, l.is_dead, l.top_family, coalesce(fam.name, '') AS top_family_name, "
            "l.top_family_frac, l.top_annotation_type, l.top_annotation_frac, a.pattern AS category, "
            "a.family AS analysis_family, a.family_f1, a.family_specific, a.concept, a.concept_f1, a.description, "
            "count(*) OVER () AS total "
            "FROM latents l LEFT JOIN latent_analysis a ON a.sae_id = l.sae_id AND a.latent = l.latent "
            "LEFT JOIN families fam ON fam.family = l.top_family "
            f"WHERE {' AND '.join(where)} "
            f"ORDER BY {LATENT_SORTS[sort]} {direction} NULLS LAST, l.latent ASC LIMIT ? OFFSET ?"
        )
        rows = self._rows(sql, params + [int(limit), int(offset)])
        total = rows[0]["total"] if rows else self._count_latents(where, params)
        for r in rows:
            r.pop("total", None)
        return rows, int(total)

    def _count_latents(self, where: list[str], params: list) -> int:
        # Only reached when the requested page is empty (offset past the end).
        return self._cur().execute(
            "SELECT count(*) FROM latents l LEFT JOIN latent_analysis a ON a.sae_id = l.sae_id AND a.latent = l.latent "
            "LEFT JOIN families fam ON fam.family = l.top_family WHERE " + " AND ".join(where),
            params,
        ).fetchone()[0]

    def random_latent(self, sae_id: str, seed: int | None = None) -> int | None:
        """A live latent chosen uniformly (``seed`` makes the choice reproducible)."""
        n = self._cur().execute("SELECT count(*) FROM latents WHERE sae_id = ? AND NOT is_dead", [sae_id]).fetchone()[0]
        if not n:
            return None
        idx = np.random.default_rng(seed).integers(n)
        row = self._cur().execute(
            "SELECT latent FROM latents WHERE sae_id = ? AND NOT is_dead ORDER BY latent LIMIT 1 OFFSET ?",
            [sae_id, int(idx)],
        ).fetchone()
        return int(row[0])

    # ---- one latent ----
    def latent(self, sae_id: str, latent: int) -> dict | None:
        """Everything the latent page shows, or None when the SAE or latent does not exist.

        Tables without rows (the analysis tables before `plmscope analyze`) are not queried.
        """
        stats = self._one("SELECT * FROM latents WHERE sae_id = ? AND latent = ?", [sae_id, latent])
        if stats is None:
            return None
        sae = next(s for s in self._saes if s["sae_id"] == sae_id)
        extra = self._sae_extra[sae_id]
        scale = float(stats["max_act"] or 0.0)
        hist_counts = stats.pop("hist_counts")
        aa_counts = stats.pop("aa_counts")
        examples = self._rows(
            "SELECT e.kind, e.bin, e.rank, e.accession, e.max_act, e.max_pos, e.n_active, e.activations, "
            "p.sequence, p.length, p.protein_name, p.entry_name, p.organism, p.families, p.locations, p.has_structure "
            "FROM latent_examples e JOIN proteins p ON p.accession = e.accession "
            "WHERE e.sae_id = ? AND e.latent = ? ORDER BY e.kind DESC, e.bin DESC NULLS FIRST, e.rank",
            [sae_id, latent],
        )
        for ex in examples:
            ex["activations"] = decode_activations(ex["activations"], scale)
            ex["label"] = protein_label(ex)
        bins = self._rows(
            "SELECT bin, lo, hi, n_proteins FROM latent_bins WHERE sae_id = ? AND latent = ? ORDER BY bin DESC",
            [sae_id, latent],
        ) if "latent_bins" in self._filled else []
        for b in bins:
            b["examples"] = [e for e in examples if e["kind"] == "bin" and e["bin"] == b["bin"]]
        families = self._rows(
            "SELECT f.family, coalesce(n.name, '') AS name, f.n_residues, f.frac FROM latent_families f "
            "LEFT JOIN families n ON n.family = f.family WHERE f.sae_id = ? AND f.latent = ? ORDER BY f.frac DESC LIMIT 50",
            [sae_id, latent],
        ) if "latent_families" in self._filled else []
        types = self._rows(
            "SELECT type, n_residues, frac FROM latent_annotation_types WHERE sae_id = ? AND latent = ? "
            "ORDER BY frac DESC LIMIT 50",
            [sae_id, latent],
        ) if "latent_annotation_types" in self._filled else []
        analysed = "latent_analysis" in self._filled
        # the join on latent_analysis only when it has rows: each join costs a hash build per request
        neighbours = self._rows(
            "SELECT n.rank, n.neighbor AS latent, n.cosine, l.top_family, l.frac_proteins, "
            + ("a.description " if analysed else "NULL AS description ")
            + "FROM latent_neighbors n LEFT JOIN latents l ON l.sae_id = n.sae_id AND l.latent = n.neighbor "
            + ("LEFT JOIN latent_analysis a ON a.sae_id = n.sae_id AND a.latent = n.neighbor " if analysed else "")
            + "WHERE n.sae_id = ? AND n.latent = ? ORDER BY n.rank",
            [sae_id, latent],
        ) if "latent_neighbors" in self._filled else []
        analysis = self._one("SELECT * FROM latent_analysis WHERE sae_id = ? AND latent = ?",
                             [sae_id, latent]) if analysed else None
        concepts = []
        if "latent_concepts" in self._filled:
            from .analysis_reads import latent_concepts  # builds on this module (see ``analysis``)

            concepts = [asdict(c) for c in latent_concepts(self._cur(), sae_id, latent)]
        return {
            "output_effect": self._output_effect(sae_id, latent),
            "sae_id": sae_id,
            "latent": latent,
            "d_sae": sae["d_sae"],
            "stats": stats,
            "histogram": {"edges": list(extra["hist_edges"]), "counts": [int(c) for c in hist_counts]},
            "aa_enrichment": aa_enrichment(aa_counts, extra["aa_background"]),
            "top_examples": [e for e in examples if e["kind"] == "top"],
            "bins": bins,
            "families": families,
            "annotation_types": types,
            "neighbours": neighbours,
            "analysis": analysis,
            "concepts": concepts,
        }

    def _output_effect(self, sae_id: str, latent: int) -> dict | None:
        """Its output effect (``causal.output_effect``) with the amino acids it promotes and
        suppresses, or None (not analysed, or an atlas from before the table existed)."""
        if "latent_output_effects" not in self._filled:
            return None
        from ..causal.output_effect import promoted
        from .analysis_reads import latent_output_effect

        row = latent_output_effect(self._cur(), sae_id, latent)
        if row is None:
            return None
        row["promotes"], row["suppresses"] = promoted(row["effect"])
        return row

    # ---- proteins ----
    def protein(self, accession: str) -> dict | None:
        p = self._one("SELECT * FROM proteins WHERE accession = ?", [accession])
        if p is None:
            return None
        p["fields"] = json.loads(p["fields"]) if p["fields"] else {}
        p["label"] = protein_label(p)
        p["annotations"] = self._rows(
            'SELECT kind, type, label, name, start, "end", score FROM annotations WHERE accession = ? '
            'ORDER BY kind, start, "end"',
            [accession],
        )
        return p

    def structures(self, accession: str, with_content: bool = True) -> list[dict]:
        cols = "structure_id, accession, file_name, chain, format, is_prediction, identity, coverage, source"
        rows = self._rows(
            f"SELECT {cols}{', content' if with_content else ''} FROM structures WHERE accession = ? "
            "ORDER BY coverage DESC, identity DESC, structure_id",
            [accession],
        )
        for s in rows:
            res = self._rows(
                "SELECT seq_pos, auth_seq_id, ins_code, plddt FROM structure_residues WHERE structure_id = ? ORDER BY seq_pos",
                [s["structure_id"]],
            )
            s["residues"] = {
                "seq_pos": [r["seq_pos"] for r in res],
                "auth_seq_id": [r["auth_seq_id"] for r in res],
                "ins_code": [r["ins_code"] for r in res],
                "plddt": [None if r["plddt"] is None else round(float(r["plddt"]), 2) for r in res]
                if s["is_prediction"]
                else None,
            }
        return rows

    def protein_top_latents(self, sae_id: str, accession: str, limit: int = 50) -> list[dict]:
        rows = self._rows(
            "SELECT pl.rank, pl.latent, pl.max_act, pl.max_pos, pl.n_active, l.max_act AS scale, l.frac_proteins, "
            "l.top_family, a.pattern AS category, a.description FROM protein_latents pl "
            "JOIN latents l ON l.sae_id = pl.sae_id AND l.latent = pl.latent "
            "LEFT JOIN latent_analysis a ON a.sae_id = pl.sae_id AND a.latent = pl.latent "
            "WHERE pl.sae_id = ? AND pl.accession = ? ORDER BY pl.rank LIMIT ?",
            [sae_id, accession, limit],
        )
        return rows

    def latent_vector(self, sae_id: str, accession: str, latent: int) -> list[float] | None:
        """Stored per-residue activations of one latent on one protein, or None when not stored.

        The atlas keeps vectors for a protein's top latents and for each latent's examples; a
        (protein, latent) pair with neither has to be computed live.
        """
        for table in ("protein_latents", "latent_examples"):
            row = self._cur().execute(
                f"SELECT t.activations, l.max_act FROM {table} t JOIN latents l "  # noqa: S608 (fixed names)
                "ON l.sae_id = t.sae_id AND l.latent = t.latent "
                "WHERE t.sae_id = ? AND t.accession = ? AND t.latent = ? LIMIT 1",
                [sae_id, accession, latent],
            ).fetchone()
            if row is not None:
                return decode_activations(row[0], row[1])
        return None

    def search_proteins(self, q: str, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        """Proteins whose accession, names, organism or Pfam families (ids or names) match ``q``."""
        like = f"%{q.strip()}%"
        rows = self._rows(
            "SELECT accession, entry_name, protein_name, organism, length, families, locations, has_structure, "
            "count(*) OVER () AS total FROM proteins p WHERE accession ILIKE ? OR entry_name ILIKE ? "
            "OR protein_name ILIKE ? OR organism ILIKE ? OR array_to_string(families, ' ') ILIKE ? OR EXISTS "
            "(SELECT 1 FROM families f WHERE list_contains(p.families, f.family) AND f.name ILIKE ?) "
            "ORDER BY (upper(accession) = upper(?)) DESC, accession LIMIT ? OFFSET ?",
            [like, like, like, like, like, like, q.strip(), int(limit), int(offset)],
        )
        total = rows[0]["total"] if rows else 0
        for r in rows:
            r.pop("total")
            r["label"] = protein_label(r)
        return rows, int(total)

    def accession_for_sequence(self, sequence: str) -> str | None:
        """Exact-sequence lookup (built once: a hash -> accession map, cheaper than scanning per request)."""
        if self._seq_index is None:
            index: dict[str, str] = {}
            for acc, seq in self._cur().execute("SELECT accession, sequence FROM proteins ORDER BY accession").fetchall():
                index.setdefault(hashlib.sha256(seq.encode()).hexdigest(), acc)
            self._seq_index = index
        return self._seq_index.get(hashlib.sha256(sequence.encode()).hexdigest())

    def latent_briefs(self, sae_id: str, latents: list[int]) -> dict[int, dict]:
        """Corpus maximum and analysis labels of a few latents (for live results).  The SAE's whole
        table is read on first use and kept (the served atlas is read-only): a live result then
        costs no query (~2 ms of a 300-residue /api/infer at 4,096 latents)."""
        if not latents:
            return {}
        table = self._briefs.get(sae_id)
        if table is None:
            with self._briefs_lock:
                table = self._briefs.get(sae_id)
                if table is None:
                    rows = self._rows(
                        "SELECT l.latent, l.max_act, l.frac_proteins, l.top_family, a.pattern AS category, a.description "
                        "FROM latents l LEFT JOIN latent_analysis a ON a.sae_id = l.sae_id AND a.latent = l.latent "
                        "WHERE l.sae_id = ?", [sae_id])
                    table = self._briefs[sae_id] = {r["latent"]: r for r in rows}
        return {int(x): dict(table[int(x)]) for x in latents if int(x) in table}

    def families(self, ids: list[str]) -> dict[str, dict]:
        if not ids:
            return {}
        rows = self._rows("SELECT family, name, description FROM families WHERE list_contains(?, family)", [ids])
        return {r["family"]: r for r in rows}


def aa_enrichment(aa_counts: list[int], background: list[int]) -> list[dict]:
    """Per amino acid: share among active residues vs among all residues, and log2 of their ratio
    (``vocab.aa_fold``, the fold the automatic descriptions quote)."""
    counts = np.asarray(aa_counts, dtype=np.float64)
    bg = np.asarray(background, dtype=np.float64)
    n, nb = counts.sum(), bg.sum()
    fold = aa_fold(counts, bg)
    out = []
    for i, aa in enumerate(AMINO_ACIDS):
        frac = counts[i] / n if n else 0.0
        bfrac = bg[i] / nb if nb else 0.0
        out.append(
            {"aa": aa, "count": int(counts[i]), "frac": round(float(frac), 5), "background_frac": round(float(bfrac), 5),
             "log2_enrichment": round(float(math.log2(fold[i])), 3)}
        )
    return out

