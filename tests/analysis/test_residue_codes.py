"""The build keeps the concept proteins' residue codes; analyze reads them instead of running the
pLM again, and recomputes only the proteins the build did not keep, with the same result."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import torch

from plmscope.cli import main
from plmscope.plm import load_plm
from plmscope.sae.io import sae_from_bytes
from plmscope.store import analysis_reads as reads
from plmscope.store.reader import read_sae_weights
from plmscope.vocab import code_values, concept_sample


def _concept_pairs(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT latent, concept, threshold, val_f1, test_f1, associated FROM latent_concepts "
                           "ORDER BY latent, concept").fetchall()
    finally:
        con.close()


def _summary(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return json.loads(con.execute("SELECT summary FROM analysis_summary").fetchall()[0][0])
    finally:
        con.close()


def test_build_keeps_each_concept_proteins_codes_as_the_sae_encodes_them(mini_atlas):
    con = duckdb.connect(str(mini_atlas), read_only=True)
    sid, d_sae, cf = con.execute("SELECT sae_id, d_sae, context_free FROM saes").fetchall()[0]
    seqs = dict(con.execute("SELECT accession, sequence FROM proteins").fetchall())
    kept = [a for (a,) in con.execute("SELECT accession FROM residue_codes ORDER BY accession").fetchall()]
    # every mini-atlas protein has a Pfam domain, and 44 < --concept-proteins' default 1000
    assert kept == sorted(seqs) and cf == 1
    codes = reads.residue_codes(con, sid, d_sae, kept[:6] + ["NOT-AN-ACCESSION"])
    assert sorted(codes) == kept[:6]
    cfg, weights = read_sae_weights(con, sid, mini_atlas)
    con.close()
    sae = sae_from_bytes(cfg, weights)
    plm = load_plm("unirep-64", device="cpu")
    for acc, z in codes.items():
        with torch.no_grad():
            rep = plm.layer_representations([seqs[acc]], [1])[0][0]
            want = sae.encode(rep[cf:]).numpy()
        assert z.shape == (len(seqs[acc]) - cf, d_sae)  # residue 1 (context-free in UniRep) left out
        assert (z.toarray() > 0).sum() == (want > 0).sum()
        # float16 as stored (the build's batched forward may differ from this one in the last bits)
        np.testing.assert_allclose(z.toarray(), want, rtol=1e-3, atol=1e-6)
        assert np.array_equal(z.data, z.data.astype(np.float16).astype(np.float32))
    assert code_values(np.array([1.0, 7e4], np.float32)).dtype == np.float32  # beyond float16: kept as is


def test_build_keeps_the_hash_sample_analyze_picks(mini_atlas, tmp_path, capsys):
    con = duckdb.connect(str(mini_atlas), read_only=True)
    corpus_accs = sorted(a for (a,) in con.execute("SELECT accession FROM proteins").fetchall())
    con.close()
    # a second build of the same inputs keeping 7 proteins' codes: vocab.concept_sample's 7
    src = mini_atlas.parent
    out = tmp_path / "seven.duckdb"
    assert main(["build", "--corpus", str(src / "corpus.tsv"), "--sae", str(src / "sae"), "--out", str(out),
                 "--top-n", "5", "--checkpoint-every", "0", "--device", "cpu", "--concept-proteins", "7"]) == 0
    con = duckdb.connect(str(out), read_only=True)
    kept = sorted(a for (a,) in con.execute("SELECT accession FROM residue_codes").fetchall())
    con.close()
    assert kept == sorted(corpus_accs[i] for i in concept_sample(corpus_accs, 7))
    # analyze with --max-proteins 7 reads exactly those; with 12 it recomputes the 5 others
    for limit, recomputed in ((7, 0), (12, 5)):
        assert main(["analyze", "--atlas", str(out), "--max-proteins", str(limit)]) == 0
        c = _summary(out)["concepts"]
        assert (c["codes_from_build"], c["codes_recomputed"], c["n_proteins"]) == (limit - recomputed, recomputed, limit)
    assert main(["build", "--corpus", str(src / "corpus.tsv"), "--sae", str(src / "sae"),
                 "--out", str(tmp_path / "x.duckdb"), "--concept-proteins", "-1"]) == 2
    assert "--concept-proteins must be 0 (none) or more, got -1" in capsys.readouterr().err


def test_analyze_reads_the_build_codes_and_recomputing_gives_the_same_concepts(mini_atlas, tmp_path):
    kept, dropped = tmp_path / "kept.duckdb", tmp_path / "dropped.duckdb"
    shutil.copyfile(mini_atlas, kept)
    shutil.copyfile(mini_atlas, dropped)
    con = duckdb.connect(str(dropped))
    con.execute("DELETE FROM residue_codes WHERE hash(accession) % 2 = 0")  # about half
    n_left = con.execute("SELECT count(*) FROM residue_codes").fetchall()[0][0]
    n = con.execute("SELECT count(*) FROM proteins").fetchall()[0][0]
    con.close()
    assert 0 < n_left < n
    for path in (kept, dropped):
        assert main(["analyze", "--atlas", str(path), "--max-proteins", "100", "--output-effect-examples", "0"]) == 0
    a, b = _summary(kept)["concepts"], _summary(dropped)["concepts"]
    assert (a["codes_from_build"], a["codes_recomputed"], a["n_proteins"]) == (n, 0, n)
    assert (b["codes_from_build"], b["codes_recomputed"]) == (n_left, n - n_left)
    pa, pb = _concept_pairs(kept), _concept_pairs(dropped)
    assert pa and [p[:2] for p in pa] == [p[:2] for p in pb]
    np.testing.assert_allclose(np.array([p[2:5] for p in pa], float), np.array([p[2:5] for p in pb], float), atol=1e-6)
    assert [p[5] for p in pa] == [p[5] for p in pb]
