"""All SQL that writes an atlas.

Publishing is atomic: everything is written to ``OUT.tmp-<pid>`` and moved over ``OUT`` with
``atomic.publish`` (plain file mode, fsync, ``os.replace``, fsync of the directory) only after the
last row is in and the connection is closed, so a crash (or Ctrl-C, or SIGKILL) leaves any previous
atlas untouched; the temporary files of a killed writer are removed by the next one
(``atomic.remove_stale``).  Adding to an existing atlas copies it to the temp file first.

Bulk inserts go through DuckDB's replacement scan of a dict of numpy arrays (``con.register``):
one ``INSERT ... SELECT`` per table chunk, columnar, no per-row Python round trips.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from .. import atomic, faults
from . import schema
# Reads of the atlas being added to are the reader's; build and merge find this one here.


WRITER_MEMORY_LIMIT = "64MB"
# DuckDB sizes its per-thread operator state by its thread count (default: every core), so a fixed
# buffer pool that suffices on 2 threads runs out on a 16-core GPU machine: the write phase uses a
# fixed number of threads, which makes its memory the same on every machine.
WRITER_THREADS = 2


def writer_config(**extra) -> dict:
    """DuckDB settings of every connection the atlas write opens (the atlas and scratch tables)."""
    return {"memory_limit": WRITER_MEMORY_LIMIT, "threads": WRITER_THREADS, **extra}


def _limit_bytes() -> int:
    return int(WRITER_MEMORY_LIMIT.removesuffix("MB")) * 1000 * 1000


class AtlasWriter:
    """``with AtlasWriter(out) as w: ...`` publishes on normal exit, discards on exception."""

    def __init__(self, out: str | Path, *, add_to_existing: bool = False) -> None:
        self.out = Path(out)
        self.tmp = atomic.temp_path(self.out)
        self.add_to_existing = add_to_existing and self.out.exists()
        self.con: duckdb.DuckDBPyConnection | None = None
        self._extra_memory = 0  # bytes above WRITER_MEMORY_LIMIT, for SAE weight blobs

    def __enter__(self) -> "AtlasWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale(self.out)
        atomic.remove(self.tmp)
        if self.add_to_existing:
            shutil.copyfile(self.out, self.tmp)
        # DuckDB's buffer pool otherwise grows with the atlas (default limit: 80 % of RAM), which
        # would make the build's peak memory depend on corpus size; past this it spills to disk.
        # Bulk appends need little of it; WRITER_MEMORY_LIMIT leaves room for wide SAEs and long proteins.
        self.con = duckdb.connect(str(self.tmp), config=writer_config())
        if not self.add_to_existing:
            schema.create_all(self.con)
            self.set_meta("schema_version", schema.SCHEMA_VERSION)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.publish()
            except BaseException:  # e.g. the disk filled up during the final CHECKPOINT
                self.discard()
                raise
        else:
            self.discard()

    def publish(self) -> None:
        assert self.con is not None
        self.con.execute("CHECKPOINT")  # flush the WAL into the file before it is renamed
        self.con.close()
        self.con = None
        faults.point("write:closed")
        atomic.publish(self.tmp, self.out)

    def discard(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            except duckdb.Error:  # a connection invalidated by a failed write: the file goes anyway
                pass
            self.con = None
        atomic.remove(self.tmp)

    # ------------------------------------------------------------------ generic bulk insert
    def insert(self, table: str, columns: dict[str, Any]) -> int:
        """Insert equal-length columns into ``table``; returns the row count (see ``insert_columns``)."""
        return insert_columns(self.con, table, columns)

    # ------------------------------------------------------------------ meta and lookups
    def set_meta(self, key: str, value: Any) -> None:
        set_meta(self.con, key, value)

    def rank_labels(self, table: str, column: str, sae_id: str, parts, n_active_res: np.ndarray,
                    top: int) -> tuple[np.ndarray, np.ndarray]:
        """See ``rank_labels``; the scratch database spills next to the temp file."""
        scratch = self.tmp.with_name(self.tmp.name + ".labels")
        try:
            return rank_labels(self.con, table, column, sae_id, parts, n_active_res, top, scratch_dir=scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def existing_accessions(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT accession FROM proteins").fetchall()}

    def existing_families(self) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT family FROM families").fetchall()}

    def write_sae(self, row: dict[str, Any]) -> None:
        """One ``saes`` row; ``position`` = after the SAEs already in the atlas."""
        pos = self.con.execute("SELECT coalesce(max(position) + 1, 0) FROM saes").fetchone()[0]
        row = dict(row, position=pos, built_at=row.get("built_at") or datetime.now(timezone.utc).replace(tzinfo=None))
        for k in ("cfg", "metrics"):
            row[k] = None if row.get(k) is None else json.dumps(row[k])
        names = list(row)
        # The weights are one BLOB (an ESM-2 650M SAE of 10,240 latents: 105 MB) that DuckDB must
        # pin whole, at the insert and again at every checkpoint up to the close, so the streaming
        # cap of the buffer pool grows by a few copies of the largest SAE for the rest of the write.
        blob = len(row.get("weights") or b"")
        if 4 * blob > self._extra_memory:
            self._extra_memory = 4 * blob
            self.con.execute(f"SET memory_limit = '{_limit_bytes() + self._extra_memory}B'")
        self.con.execute(
            f"INSERT INTO saes ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
            [row[k] for k in names],
        )

    def update_protein_flags(self, accessions_with_structure: list[str]) -> None:
        if accessions_with_structure:
            self.con.register("_acc", {"accession": _obj(accessions_with_structure)})
            self.con.execute("UPDATE proteins SET has_structure = true WHERE accession IN (SELECT accession FROM _acc)")
            self.con.unregister("_acc")


def set_meta(con, key: str, value: Any) -> None:
    """One ``atlas_meta`` entry (JSON), replacing an earlier value of ``key``."""
    con.execute("INSERT OR REPLACE INTO atlas_meta (key, value) VALUES (?, ?)", [key, json.dumps(value, default=str)])


def insert_columns(con, table: str, columns: dict[str, Any]) -> int:
    """``INSERT INTO table`` from equal-length columns (numpy arrays or lists); returns the row count.

    A scalar column (e.g. ``sae_id``, the same on every row) is bound as one SQL parameter: as a
    numpy object column it would cost a pointer per row in Python and a string per row in DuckDB's
    conversion (``np.full(n, "id", dtype=object)`` even makes n separate str objects).
    """
    if table not in schema.TABLES:
        raise ValueError(f"unknown atlas table {table!r}")
    consts = {k: v for k, v in columns.items() if v is None or isinstance(v, (str, bytes, int, float, bool, np.generic))}
    cols = {k: (v if isinstance(v, np.ndarray) else _obj(v)) for k, v in columns.items() if k not in consts}
    n = {len(v) for v in cols.values()}
    if len(n) != 1:
        raise ValueError(f"{table}: columns of different lengths {n}" if n else f"{table}: no column with rows")
    if not n.pop():
        return 0
    names = ", ".join(f'"{c}"' for c in [*consts, *cols])
    select = ", ".join(["?"] * len(consts) + [f'"{c}"' for c in cols])
    con.register("_src", cols)
    try:
        con.execute(f"INSERT INTO {table} ({names}) SELECT {select} FROM _src",  # noqa: S608 (schema names)
                    [v.item() if isinstance(v, np.generic) else v for v in consts.values()])
    finally:
        con.unregister("_src")
    return len(next(iter(cols.values())))


def rank_labels(con, table: str, column: str, sae_id: str, parts, n_active_res: np.ndarray, top: int,
                *, scratch_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Sum the (label, latent) counts of ``parts`` and insert each latent's ``top`` labels into
    ``table`` (``latent_families`` / ``latent_annotation_types``), ranked by count, ties by label.

    ``parts`` yields ``(labels, code, latent, n)`` per spill part, codes local to their part
    (``atlas.finalize.label_parts``).  The same pair appears in many parts (8.8M rows for 1.26M
    pairs after 20k demo proteins), so neither the build nor the write phase holds the corpus's
    (label, latent) table in Python: a scratch DuckDB sums them, with a buffer pool of its own
    (the atlas's holds the proteins' key indexes) that spills to ``scratch_dir``.  Labels get
    global integer ids here (one dict entry per distinct label): integer group keys keep that
    aggregate within the limit, where string keys joined per part ran out of memory.
    ``frac`` = the count over the latent's active residues.  Returns every latent's top label
    and its ``frac`` (object arrays, None where a latent has none) for the ``latents`` table.
    """
    L = len(n_active_res)
    ids: dict[str, int] = {}
    scratch = duckdb.connect(":memory:", config=writer_config(temp_directory=str(scratch_dir)))
    try:
        scratch.execute("CREATE TABLE label_counts (label INTEGER, latent INTEGER, n BIGINT)")
        for labels, code, latent, n in parts:
            if len(n):
                to_id = np.array([ids.setdefault(str(x), len(ids)) for x in labels], dtype=np.int32)
                _insert_into(scratch, "label_counts", {"label": to_id[np.asarray(code)],
                                                       "latent": np.asarray(latent, np.int32), "n": np.asarray(n, np.int64)})
        names = _obj(list(ids))
        by_text = np.empty(len(names), np.int32)  # ties by label text, as integers
        by_text[np.argsort(names.astype(str), kind="stable")] = np.arange(len(names), dtype=np.int32)
        scratch.execute("CREATE TABLE label_names (label INTEGER, by_text INTEGER)")
        _insert_into(scratch, "label_names", {"label": np.arange(len(names), dtype=np.int32), "by_text": by_text})
        ranked = scratch.execute(
            "SELECT c.latent, c.label, c.n, row_number() OVER (PARTITION BY c.latent ORDER BY c.n DESC, d.by_text) AS rank "
            "FROM (SELECT latent, label, CAST(sum(n) AS BIGINT) AS n FROM label_counts GROUP BY latent, label) c "
            "JOIN label_names d ON d.label = c.label QUALIFY rank <= ? ORDER BY c.latent, rank", [top]).fetchnumpy()
    finally:
        scratch.close()
    lat = np.asarray(ranked["latent"], dtype=np.int64)
    n = np.asarray(ranked["n"], dtype=np.int64)
    label = names[np.asarray(ranked["label"], dtype=np.int64)] if len(lat) else _obj([])
    frac = n / np.maximum(np.asarray(n_active_res, np.int64)[lat], 1)
    insert_columns(con, table, {"sae_id": sae_id, "latent": lat.astype(np.int32), column: label,
                                "n_residues": n, "frac": frac})
    first = np.asarray(ranked["rank"]) == 1
    top_label = np.full(L, None, dtype=object)
    top_frac = np.full(L, None, dtype=object)
    top_label[lat[first]] = label[first]
    top_frac[lat[first]] = _obj(frac[first].tolist())
    return top_label, top_frac


def _insert_into(con, table: str, cols: dict[str, np.ndarray]) -> None:
    con.register("_src", cols)
    try:
        names = ", ".join(cols)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _src")  # noqa: S608 (scratch tables)
    finally:
        con.unregister("_src")


def _obj(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out
