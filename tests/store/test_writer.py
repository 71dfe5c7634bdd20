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
