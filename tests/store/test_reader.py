"""store/reader.py against the real tiny atlas built by `plmscope build`."""

from __future__ import annotations

import shutil

import duckdb
import pytest

from plmscope.errors import AtlasError
from plmscope.store.analysis_reads import SaeAnalysis
from plmscope.store.reader import LATENT_SORTS, AtlasReader, decode_activations, protein_label, read_existing_meta
from plmscope.vocab import AMINO_ACIDS


@pytest.fixture(scope="module")
def reader(tiny_atlas):
    r = AtlasReader(tiny_atlas.path)
    yield r
    r.close()


@pytest.fixture(scope="module")
def sae_id(reader):
    return reader.saes()[0]["sae_id"]


def test_overview(reader, tiny_atlas):
    ov = reader.overview()
    assert ov["atlas_id"] and ov["atlas_id"] == reader.atlas_id
    assert ov["corpus"]["n_proteins"] > 50  # ~70 chosen, minus rejected records
    assert ov["corpus"]["n_with_structure"] > 0
    (s,) = ov["saes"]
    assert s["d_sae"] == 128 and s["k"] == 8 and s["layer"] == 2
    assert 0 <= s["dead_fraction"] <= 1
    assert "weights" not in s and "cfg" not in s


def test_read_only(reader):
    with pytest.raises(duckdb.Error):
        reader._cur().execute("DELETE FROM proteins")


def test_latent_list_sort_page_total(reader, sae_id):
    rows, total = reader.latent_list(sae_id, sort="max_act", desc=True, limit=10)
    assert 0 < len(rows) <= 10 and total >= len(rows)
    maxes = [r["max_act"] for r in rows]
    assert maxes == sorted(maxes, reverse=True)
    assert not any(r["is_dead"] for r in rows)
    page2, total2 = reader.latent_list(sae_id, sort="max_act", desc=True, limit=10, offset=10)
    assert total2 == total and not {r["latent"] for r in rows} & {r["latent"] for r in page2}
    everything, n_all = reader.latent_list(sae_id, include_dead=True, limit=1000)
    assert n_all == 128 == len(everything)
    empty, n = reader.latent_list(sae_id, offset=10_000)
    assert empty == [] and n == total
    with pytest.raises(ValueError):
        reader.latent_list(sae_id, sort="max_act; DROP TABLE latents")
    assert set(LATENT_SORTS) >= {"latent", "max_act", "frac_proteins"}


def test_latent_list_filters_and_search(reader, sae_id):
    rows, _ = reader.latent_list(sae_id, limit=1000)
    fam = next(r["top_family"] for r in rows if r["top_family"])
    by_fam, n = reader.latent_list(sae_id, family=fam, limit=1000)
    assert n >= 1 and all(
        r["top_family"] == fam or any(f["family"] == fam for f in reader.latent(sae_id, r["latent"])["families"])
        for r in by_fam
    )
    typ = next(r["top_annotation_type"] for r in rows if r["top_annotation_type"])
    by_type, n = reader.latent_list(sae_id, annotation_type=typ, limit=1000)
    assert n >= 1
    found, n = reader.latent_list(sae_id, q=fam.lower(), limit=1000)  # case-insensitive over families
    assert n >= 1
    by_number, _ = reader.latent_list(sae_id, q=str(rows[0]["latent"]), limit=1000)
    assert rows[0]["latent"] in {r["latent"] for r in by_number}
    none, n = reader.latent_list(sae_id, q="no latent is described like this", limit=10)
    assert none == [] and n == 0
    # quote characters are data, not SQL
    odd, n = reader.latent_list(sae_id, q="'; DROP TABLE latents; --", limit=10)
    assert n == 0 and reader.latent_list(sae_id, limit=1)[1] > 0


def test_latent_detail_decodes_activations(reader, sae_id):
    rows, _ = reader.latent_list(sae_id, limit=1)
    d = reader.latent(sae_id, rows[0]["latent"])
    scale = d["stats"]["max_act"]
    assert d["top_examples"]
    for ex in d["top_examples"]:
        acts = ex["activations"]
        assert len(acts) == min(ex["length"], 1022)
        assert abs(max(acts) - ex["max_act"]) <= scale / 510 + 1e-3
        assert abs(acts[ex["max_pos"] - 1] - ex["max_act"]) <= scale / 510 + 1e-3
        assert sum(a > 0 for a in acts) == ex["n_active"]
        assert ex["label"]
    assert len(d["histogram"]["edges"]) == len(d["histogram"]["counts"]) + 1
    assert len(d["aa_enrichment"]) == 20 and {e["aa"] for e in d["aa_enrichment"]} == set(AMINO_ACIDS)
    assert d["bins"] and all(b["lo"] <= b["hi"] for b in d["bins"])
    assert [n["rank"] for n in d["neighbours"]] == sorted(n["rank"] for n in d["neighbours"])
    assert reader.latent(sae_id, 10_000) is None
    assert reader.latent("no-such-sae", 0) is None


def test_decode_activations():
    assert decode_activations(bytes([0, 255, 51]), 2.0) == [0.0, 2.0, 0.4]
    assert decode_activations(b"", 1.0) == []


def test_protein_detail_and_labels(reader, sae_id):
    hits, total = reader.search_proteins("", limit=500)
    assert total == len(hits) > 50
    assert all(h["label"] for h in hits)  # never blank, even without a name
    unnamed = [h for h in hits if not h["protein_name"] and not h["entry_name"]]
    assert unnamed and all(h["label"] != "" for h in unnamed)
    with_structure = next(h for h in hits if h["has_structure"])
    p = reader.protein(with_structure["accession"])
    assert p["sequence"] and p["length"] == len(p["sequence"]) and p["label"]
    structures = reader.structures(p["accession"])
    assert structures
    s = structures[0]
    assert s["content"].lstrip().startswith(("ATOM", "HETATM", "REMARK", "HEADER", "CRYST1", "MODEL"))
    assert len(s["residues"]["seq_pos"]) == len(s["residues"]["auth_seq_id"]) > 0
    assert all(1 <= x <= p["length"] for x in s["residues"]["seq_pos"])
    top = reader.protein_top_latents(sae_id, p["accession"])
    assert top and [t["rank"] for t in top] == sorted(t["rank"] for t in top)
    vec = reader.latent_vector(sae_id, p["accession"], top[0]["latent"])
    assert len(vec) == p["length"] and abs(max(vec) - top[0]["max_act"]) < top[0]["scale"] / 255 + 1e-3
    assert reader.accession_for_sequence(p["sequence"]) == p["accession"]
    assert reader.accession_for_sequence("MKV") is None
    assert reader.protein("NOT_AN_ACCESSION") is None
    by_acc, _ = reader.search_proteins(p["accession"].lower())
    assert by_acc[0]["accession"] == p["accession"]


def test_protein_label_fallback():
    assert protein_label({"protein_name": "Haemoglobin"}) == "Haemoglobin"
    assert protein_label({"families": ["PF00042"], "locations": ["cytoplasm"]}) == "PF00042 · cytoplasm"
    assert protein_label({}) == "unnamed protein"


def test_random_latent(reader, sae_id):
    a = reader.random_latent(sae_id, seed=1)
    assert a == reader.random_latent(sae_id, seed=1)
    assert not reader.latent(sae_id, a)["stats"]["is_dead"]


def test_sae_weights_roundtrip(reader, sae_id, tiny_atlas):
    from plmscope.sae.io import sae_from_bytes

    cfg, weights = reader.sae_weights(sae_id)
    sae = sae_from_bytes(cfg, weights)
    assert sae.d_sae == 128
    with pytest.raises(AtlasError):
        reader.sae_weights("missing")


def test_friendly_errors_for_bad_files(tmp_path, tiny_atlas):
    with pytest.raises(AtlasError, match="does not exist"):
        AtlasReader(tmp_path / "missing.duckdb")
    junk = tmp_path / "junk.duckdb"
    junk.write_text("not a database")
    with pytest.raises(AtlasError, match="not a readable DuckDB atlas"):
        AtlasReader(junk)
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    with pytest.raises(AtlasError, match="not a plmscope atlas"):
        AtlasReader(empty)
    old = tmp_path / "old.duckdb"
    shutil.copy(tiny_atlas.path, old)
    con = duckdb.connect(str(old))
    con.execute("UPDATE atlas_meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(AtlasError, match="schema version 0"):
        AtlasReader(old)
    with pytest.raises(AtlasError, match="schema version 0"):  # a build adding to it: the same check
        read_existing_meta(old)
    with pytest.raises(AtlasError, match="not a plmscope atlas"):
        read_existing_meta(empty)


def test_existing_meta_for_a_build_adding_to_the_atlas(reader, sae_id, tiny_atlas):
    meta = read_existing_meta(tiny_atlas.path)
    assert meta["_sae_ids"] == [sae_id] and meta["atlas_id"] == reader.atlas_id


def test_analysis_page_before_analyze(reader, sae_id):
    page = reader.analysis()
    assert not page.has_analysis and page.atlas_id == reader.atlas_id
    (sae,) = page.saes
    assert sae.sae_id == sae_id and not sae.analyzed and not isinstance(sae, SaeAnalysis)
