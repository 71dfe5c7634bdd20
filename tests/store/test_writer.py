"""Atomic publishing and the uint8 activation encoding of the atlas writer."""

import hashlib

import duckdb
import numpy as np
import pytest

from plmscope.vocab import dequantize
from plmscope.store.writer import AtlasWriter


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_failed_write_leaves_old_atlas_untouched(tiny_atlas, tmp_path):
    out = tmp_path / "a.duckdb"
    out.write_bytes(tiny_atlas.path.read_bytes())
    before = _sha(out)
    with pytest.raises(RuntimeError):
        with AtlasWriter(out, add_to_existing=True) as w:
            w.insert("families", {"family": ["PFX"], "name": ["x"], "description": [""]})
            raise RuntimeError("interrupted")
    assert _sha(out) == before and not list(tmp_path.glob("a.duckdb.tmp-*"))
    with pytest.raises(RuntimeError):
        with AtlasWriter(tmp_path / "new.duckdb") as w:
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new.duckdb").exists()


def test_publish_adds_rows_to_a_copy(tiny_atlas, tmp_path):
    out = tmp_path / "a.duckdb"
    out.write_bytes(tiny_atlas.path.read_bytes())
    with AtlasWriter(out, add_to_existing=True) as w:
        w.insert("families", {"family": ["PFTEST"], "name": ["x"], "description": [""]})
        w.set_meta("note", {"a": 1})
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT name FROM families WHERE family='PFTEST'").fetchone() == ("x",)
    con.close()


def test_insert_binds_scalar_columns_once_per_row(tmp_path):
    """A scalar column (sae_id) is the same value on every row; mismatched lengths are refused."""
    with AtlasWriter(tmp_path / "a.duckdb") as w:
        n = w.insert("latent_neighbors", {"sae_id": "s.L1", "latent": np.arange(3, dtype=np.int32), "rank": 0,
                                          "neighbor": np.array([2, 0, 1], dtype=np.int32),
                                          "cosine": np.array([0.5, 0.25, 0.125], dtype=np.float32)})
        assert n == 3
        assert w.insert("latent_neighbors", {"sae_id": "s.L1", "latent": np.empty(0, np.int32), "rank": 0,
                                             "neighbor": np.empty(0, np.int32), "cosine": np.empty(0, np.float32)}) == 0
        with pytest.raises(ValueError, match="different lengths"):
            w.insert("latent_neighbors", {"sae_id": "s", "latent": [1, 2], "rank": [0], "neighbor": [0, 1], "cosine": [0.1, 0.2]})
        with pytest.raises(ValueError, match="no column with rows"):
            w.insert("latent_neighbors", {"sae_id": "s", "latent": 1, "rank": 0, "neighbor": 0, "cosine": 0.1})
        with pytest.raises(ValueError, match="unknown atlas table"):
            w.insert("nope", {"a": [1]})
    con = duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True)
    rows = con.execute("SELECT sae_id, latent, rank, neighbor, cosine FROM latent_neighbors ORDER BY latent").fetchall()
    con.close()
    assert rows == [("s.L1", 0, 0, 2, 0.5), ("s.L1", 1, 0, 0, 0.25), ("s.L1", 2, 0, 1, 0.125)]


def test_atlas_blobs_decode_within_bound(tiny_atlas):
    """Blob length = residues the pLM saw; every value within [0, max_act]."""
    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    rows = con.execute("""SELECT e.activations, l.max_act, e.max_act, e.max_pos, least(p.length, coalesce(p.truncated_to, p.length))
                          FROM latent_examples e JOIN latents l USING (sae_id, latent)
                          JOIN proteins p USING (accession) LIMIT 300""").fetchall()
    con.close()
    assert rows
    for blob, scale, mx, pos, n in rows:
        v = dequantize(np.frombuffer(blob, np.uint8), scale)
        assert len(v) == n
        assert abs(v[pos - 1] - mx) <= scale / 510 * (1 + 1e-6)
        assert v.max() <= scale * (1 + 1e-6)


def test_sae_weights_larger_than_the_writer_pool(tmp_path):
    """An ESM-2 650M-sized SAE (10,240 x 1280 latents: ~105 MB of weights) fits in one row although
    the writer's buffer pool is capped far below that for streaming."""
    weights = np.random.default_rng(0).bytes(2 * 10240 * 1280 * 4 + 1)
    row = {"sae_id": "big", "plm": "esm2_t33_650M_UR50D", "layer": 24, "architecture": "topk", "d_in": 1280,
           "d_sae": 10240, "k": 64, "cfg": {}, "metrics": None, "n_dead": 0, "n_proteins": 1, "n_residues": 1,
           "hist_edges": [0.0, 1.0], "aa_background": [0] * 20, "weights": weights}
    with AtlasWriter(tmp_path / "a.duckdb") as w:
        w.write_sae(row)
    con = duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True)
    assert con.execute("SELECT weights FROM saes WHERE sae_id = 'big'").fetchone()[0] == weights
    con.close()


def test_write_phase_memory_does_not_depend_on_the_core_count(tmp_path, monkeypatch):
    """Every DuckDB connection of the write phase asks for WRITER_THREADS threads: with DuckDB's
    default (one per core) the 64 MB pool ran out ranking 8M (label, latent) counts on a 16-core
    machine.  Here the same ranking runs; the settings asked for and those in force are checked."""
    from plmscope.store import writer as W

    seen = []
    connect = duckdb.connect

    def recording_connect(database, *args, **kwargs):
        con = connect(database, *args, **kwargs)
        asked = kwargs.get("config", {}).get("threads")
        seen.append((asked, con.execute("SELECT current_setting('threads')").fetchall()[0][0]))
        return con

    monkeypatch.setattr(W.duckdb, "connect", recording_connect)
    rng = np.random.default_rng(0)
    labels = np.array([f"PF{i:05d}" for i in range(3000)], dtype=object)
    parts = ((labels, rng.integers(0, 3000, 200_000), rng.integers(0, 10240, 200_000), rng.integers(1, 50, 200_000))
             for _ in range(40))
    with W.AtlasWriter(tmp_path / "a.duckdb") as w:
        top, _ = W.rank_labels(w.con, "latent_families", "family", "s", parts, np.full(10240, 1000), 5,
                               scratch_dir=tmp_path)
    assert sum(x is not None for x in top) == 10240
    assert len(seen) == 2 and all(asked == used == W.WRITER_THREADS for asked, used in seen)
