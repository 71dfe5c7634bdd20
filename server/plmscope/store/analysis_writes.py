"""The writes of `plmscope analyze`: its results into the analysis tables of its private copy of
the atlas (published atomically by the caller).

Bulk rows go in as dicts of numpy arrays through the writer's ``insert_columns`` (DuckDB scans
them directly), orders of magnitude faster than ``executemany`` for per-latent tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .reader import connect
from .schema import ANALYSIS_TABLES, LATER_ANALYSIS_TABLES, TABLES
from .writer import insert_columns


def open_for_writing(path: str | Path, display: str | Path):
    """A writable connection on the analysis' private copy of the atlas (``display``: the atlas it copies)."""
    return connect(path, read_only=False, display=display)


def ensure_analysis_tables(con) -> None:
    """Create the analysis tables an atlas built before they existed lacks (they start empty)."""
    have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    for table in ANALYSIS_TABLES + LATER_ANALYSIS_TABLES:
        if table not in have:
            con.execute(TABLES[table])


def write_output_effects(con, sae_id: str, latents, effect, n_examples, n_positions) -> None:
    """``causal.output_effect.OutputEffects`` rows: one per latent, its 20 effects as a list."""
    con.executemany(
        "INSERT INTO latent_output_effects VALUES (?, ?, ?, ?, ?)",
        [[sae_id, int(lat), [float(v) for v in eff], int(ne), int(npos)]
         for lat, eff, ne, npos in zip(latents, effect, n_examples, n_positions)],
    )


def clear_analysis(con, sae_id: str) -> None:
    """Remove a previous analysis of one SAE (re-running replaces it)."""
    for table in ANALYSIS_TABLES + ("concept_sources",):
        con.execute(f"DELETE FROM {table} WHERE sae_id = ?", [sae_id])  # noqa: S608 (table names from the schema)


def write_latent_analysis(con, sae_id: str, rows: dict[str, np.ndarray]) -> None:
    insert_columns(con, "latent_analysis", {"sae_id": sae_id, **rows})


def write_latent_concepts(con, sae_id: str, rows: dict[str, np.ndarray]) -> None:
    insert_columns(con, "latent_concepts", {"sae_id": sae_id, **rows})


def _insert_row(con, table: str, row: dict) -> None:
    cols = list(row)
    con.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",  # noqa: S608 (schema names)
                [row[c] for c in cols])


def write_probe_result(con, sae_id: str, row: dict) -> None:
    """One probe_results row (a fit or the majority baseline); ``row`` has the table's columns."""
    _insert_row(con, "probe_results", {"sae_id": sae_id, **row})


def write_probe_comparison(con, sae_id: str, row: dict) -> None:
    """One probe_comparisons row: SAE vs raw at one pooling."""
    _insert_row(con, "probe_comparisons", {"sae_id": sae_id, **row})


def write_probe_latents(con, sae_id: str, task: str, features: str, rows: list[dict]) -> None:
    """The top latents of one SAE fit (``probes.top_latents`` rows)."""
    if not rows:
        return
    con.executemany(
        "INSERT INTO probe_latents (sae_id, task, features, class, sign, rank, latent, pooling, weight, frac_class, frac_rest) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [[sae_id, task, features, r["class"], r["sign"], r["rank"], r["latent"], r["pooling"], r["weight"],
          r["frac_class"], r["frac_rest"]] for r in rows],
    )


def write_summary(con, sae_id: str, summary: dict) -> None:
    con.execute("INSERT INTO analysis_summary VALUES (?, ?)", [sae_id, json.dumps(summary, default=float)])


def checkpoint(con) -> None:
    """Flush the WAL into the file before it is renamed over the published atlas."""
    con.execute("CHECKPOINT")


def write_concept_sources(con, sae_id: str, rows: list[dict]) -> None:
    """One SAE's ``concepts.inventory`` rows."""
    if not rows:
        return
    con.executemany(
        "INSERT INTO concept_sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [[sae_id, r["concept"], r["level"], json.dumps(r["sources"]), r["n_proteins"], r["n_regions"], r["n_val"],
          r["n_test"], r["scored"], r["tested"], r["n_associated_latents"]] for r in rows])


def replace_findings(con, findings: list) -> None:
    """The findings (``analysis.findings.Finding``) replace every previous one."""
    con.execute("DELETE FROM findings")
    con.execute("DELETE FROM finding_values")
    for pos, f in enumerate(findings):
        con.execute("INSERT INTO findings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [f.claim, pos, f.statement, f.test, f.metric, f.verdict, f.reason, json.dumps(f.details, default=float)])
        if f.values:
            con.executemany("INSERT INTO finding_values VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [[f.claim, v.series, v.layer, v.value, v.lo, v.hi, v.k, v.n, v.sae_ids] for v in f.values])
