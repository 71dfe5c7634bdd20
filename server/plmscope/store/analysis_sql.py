"""All SQL of `plmscope analyze`: what it reads from an atlas, what it writes back, and the reads
behind the web's ``/analysis`` page.

Analysis code never writes SQL; it calls these functions with a DuckDB connection (for analyze:
a read-write connection on the temporary copy that is published atomically; for the web: a
read-only cursor).  Bulk rows go in as dicts of numpy arrays (DuckDB scans them directly), which
is orders of magnitude faster than ``executemany`` for per-latent tables.
"""

from __future__ import annotations

import json
import math
from typing import Any

import duckdb
import numpy as np

from ..errors import AtlasError
from .schema import SCHEMA_VERSION
from .writer import insert_columns

ANALYSIS_TABLES = ("latent_analysis", "latent_concepts", "probe_results", "probe_latents", "analysis_summary")
_INPUT_TABLES = ("atlas_meta", "saes", "proteins", "annotations", "latents", "latent_examples", "protein_latent_stats")


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _first(res):
    # fetchall, not fetchone: DuckDB 2 refuses new statements while a result is only partly read.
    rows = res.fetchall()
    return rows[0] if rows else None


def _dicts(res) -> list[dict]:
    cols = [d[0] for d in res.description]
    return [{c: _clean(v) for c, v in zip(cols, row)} for row in res.fetchall()]


# ---------------------------------------------------------------- reads for analyze
def check_atlas(con, path: str) -> None:
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    missing = [t for t in _INPUT_TABLES + ANALYSIS_TABLES if t not in tables]
    if missing:
        raise AtlasError(f"{path} is not a plmscope atlas: tables {', '.join(missing)} are missing")
    row = _first(con.execute("SELECT value FROM atlas_meta WHERE key = 'schema_version'"))
    version = json.loads(row[0]) if row else None
    if version != SCHEMA_VERSION:
        raise AtlasError(f"{path} has atlas schema version {version}; this plmscope analyzes version {SCHEMA_VERSION}")


def saes(con) -> list[dict]:
    rows = _dicts(con.execute("SELECT sae_id, plm, layer, d_in, d_sae, n_proteins FROM saes ORDER BY position, sae_id"))
    return rows


def sae_weights(con, sae_id: str) -> tuple[dict, bytes]:
    row = _first(con.execute("SELECT cfg, weights FROM saes WHERE sae_id = ?", [sae_id]))
    return json.loads(row[0]), bytes(row[1])


def aa_background(con, sae_id: str) -> np.ndarray:
    return np.asarray(_first(con.execute("SELECT aa_background FROM saes WHERE sae_id = ?", [sae_id]))[0])


def latents(con, sae_id: str, d_sae: int) -> dict[str, np.ndarray]:
    """Per-latent arrays indexed by latent number (length d_sae)."""
    rows = con.execute(
        "SELECT latent, max_act, is_dead, n_active_proteins, aa_counts FROM latents WHERE sae_id = ?", [sae_id]
    ).fetchall()
    out = {
        "max_act": np.zeros(d_sae, np.float32),
        "is_dead": np.ones(d_sae, bool),
        "n_active_proteins": np.zeros(d_sae, np.int64),
        "aa_counts": np.zeros((d_sae, 20), np.int64),
    }
    for lat, mx, dead, nap, aa in rows:
        out["max_act"][lat] = mx
        out["is_dead"][lat] = dead
        out["n_active_proteins"][lat] = nap
        out["aa_counts"][lat] = aa
    return out


def proteins(con) -> list[dict]:
    return _dicts(con.execute("SELECT accession, length, sequence, locations, families, truncated_to FROM proteins ORDER BY accession"))


def protein_latent_stats(con, sae_id: str) -> dict[str, np.ndarray]:
    """accession (object), latent, max_act, sum_act of every active protein x latent pair."""
    return con.execute(
        "SELECT accession, latent, max_act, sum_act FROM protein_latent_stats WHERE sae_id = ?", [sae_id]
    ).fetchnumpy()


def embeddings(con, sae_id: str) -> tuple[list[str], np.ndarray | None]:
    rows = con.execute("SELECT accession, mean_rep FROM protein_embeddings WHERE sae_id = ? ORDER BY accession", [sae_id]).fetchall()
    if not rows:
        return [], None
    return [r[0] for r in rows], np.asarray([r[1] for r in rows], dtype=np.float32)


def top_examples(con, sae_id: str, per_latent: int) -> list[tuple[int, bytes]]:
    """(latent, uint8 activations) of each latent's strongest ``per_latent`` examples."""
    rows = con.execute(
        "SELECT latent, activations FROM latent_examples WHERE sae_id = ? AND kind = 'top' AND rank < ? ORDER BY latent, rank",
        [sae_id, per_latent],
    ).fetchall()
    return [(int(lat), bytes(blob)) for lat, blob in rows]


def annotations(con) -> list[dict]:
    return _dicts(con.execute('SELECT accession, kind, type, label, start, "end" FROM annotations'))


def family_names(con) -> dict[str, str]:
    return dict(con.execute("SELECT family, name FROM families").fetchall())


def structures_for_secondary(con) -> list[dict]:
    """Best structure per protein (highest coverage, then identity) with its residue map."""
    rows = _dicts(
        con.execute(
            "SELECT structure_id, accession, content FROM ("
            "  SELECT *, row_number() OVER (PARTITION BY accession ORDER BY coverage DESC, identity DESC, structure_id) AS r"
            "  FROM structures) WHERE r = 1 ORDER BY accession"
        )
    )
    for row in rows:
        res = con.execute(
            "SELECT auth_seq_id, ins_code, seq_pos FROM structure_residues WHERE structure_id = ?", [row["structure_id"]]
        ).fetchall()
        row["residue_map"] = {(int(a), (i or "").strip()): int(p) for a, i, p in res}
    return rows


# ---------------------------------------------------------------- writes
def clear_analysis(con, sae_id: str) -> None:
    """Remove a previous analysis of one SAE (re-running replaces it)."""
    for table in ANALYSIS_TABLES:
        con.execute(f"DELETE FROM {table} WHERE sae_id = ?", [sae_id])  # noqa: S608 (table names from the schema)


def write_latent_analysis(con, sae_id: str, rows: dict[str, np.ndarray]) -> None:
    insert_columns(con, "latent_analysis", {"sae_id": sae_id, **rows})


def write_latent_concepts(con, sae_id: str, rows: dict[str, np.ndarray]) -> None:
    insert_columns(con, "latent_concepts", {"sae_id": sae_id, **rows})


def write_probe(con, sae_id: str, result: dict, latent_rows: list[dict]) -> None:
    con.execute(
        "INSERT INTO probe_results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [sae_id, result["task"], result["features"], result["accuracy"], result["macro_f1"],
         result["n_train"], result["n_test"], result["classes"]],
    )
    if latent_rows:
        con.executemany(
            "INSERT INTO probe_latents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [[sae_id, result["task"], r["class"], r["sign"], r["rank"], r["latent"], r["pooling"], r["weight"]] for r in latent_rows],
        )


def write_summary(con, sae_id: str, summary: dict) -> None:
    con.execute("INSERT INTO analysis_summary VALUES (?, ?)", [sae_id, json.dumps(summary, default=float)])


# ---------------------------------------------------------------- reads for the web
def analysis_page(con, concept_limit: int = 60) -> dict:
    """Everything the /analysis page shows, per SAE (layer), JSON-ready."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if not set(ANALYSIS_TABLES) <= tables:
        return {"has_analysis": False, "saes": []}
    out = []
    for sae in _dicts(con.execute("SELECT sae_id, plm, layer, d_sae, architecture, k FROM saes ORDER BY position, sae_id")):
        sid = sae["sae_id"]
        row = _first(con.execute("SELECT summary FROM analysis_summary WHERE sae_id = ?", [sid]))
        if row is None:
            out.append({**sae, "analyzed": False})
            continue
        patterns = _dicts(con.execute(
            "SELECT pattern, count(*) AS n FROM latent_analysis WHERE sae_id = ? GROUP BY pattern ORDER BY n DESC", [sid]))
        probes = _dicts(con.execute(
            "SELECT task, features, accuracy, macro_f1, n_train, n_test, classes FROM probe_results "
            "WHERE sae_id = ? ORDER BY task, features DESC", [sid]))
        top = _dicts(con.execute(
            "SELECT p.task, p.class, p.sign, p.rank, p.latent, p.pooling, p.weight, a.description "
            "FROM probe_latents p LEFT JOIN latent_analysis a ON a.sae_id = p.sae_id AND a.latent = p.latent "
            "WHERE p.sae_id = ? ORDER BY p.task, p.class, p.sign DESC, p.rank", [sid]))
        by_class: dict[str, dict[str, dict[str, list]]] = {}
        for r in top:
            cls = by_class.setdefault(r["task"], {}).setdefault(r["class"], {"positive": [], "negative": []})
            cls[r["sign"]].append({k: r[k] for k in ("rank", "latent", "pooling", "weight", "description")})
        concepts = _dicts(con.execute(
            "SELECT concept, count(*) AS n_latents, max(test_f1) AS best_f1, "
            "arg_max(latent, test_f1) AS best_latent FROM latent_concepts WHERE sae_id = ? AND associated "
            "GROUP BY concept ORDER BY n_latents DESC, best_f1 DESC, concept LIMIT ?", [sid, concept_limit]))
        specific = _dicts(con.execute(
            "SELECT latent, family, family_f1, family_precision, family_auc, description FROM latent_analysis "
            "WHERE sae_id = ? AND family_specific ORDER BY family_f1 DESC, latent LIMIT 30", [sid]))
        out.append({
            **sae,
            "analyzed": True,
            "summary": json.loads(row[0]),
            "patterns": patterns,
            "probes": probes,
            "probe_latents": by_class,
            "concepts": concepts,
            "family_specific": specific,
        })
    return {"has_analysis": any(s.get("analyzed") for s in out), "saes": out}


def open_for_writing(path: str, display: str):
    """A writable connection on the analysis' private copy of the atlas."""
    try:
        return duckdb.connect(path)
    except duckdb.Error as exc:
        raise AtlasError(f"{display} is not a readable DuckDB atlas: {exc}") from None


def checkpoint(con) -> None:
    """Flush the WAL into the file before it is renamed over the published atlas."""
    con.execute("CHECKPOINT")
