"""Pfam annotation through pyhmmer with gathering cutoffs, on an HMM built here from a real protein."""

import csv
import gzip

import pytest

from plmscope.atlas.pfam import annotate
from plmscope.errors import InputError
from plmscope.sequences import Protein

from tests._paths import DEMO


def _demo(n=40):
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        rows = []
        for r in csv.DictReader(fh, delimiter="\t"):
            rows.append(r)
            if len(rows) >= n:
                break
    return rows


def _write_hmm(path, seq, name, ga):
    import pyhmmer
    alphabet = pyhmmer.easel.Alphabet.amino()
    builder = pyhmmer.plan7.Builder(alphabet)
    background = pyhmmer.plan7.Background(alphabet)
    dseq = pyhmmer.easel.TextSequence(name=name.encode(), sequence=seq).digitize(alphabet)
    hmm, _, _ = builder.build(dseq, background)
    hmm.name = name.encode() if isinstance(hmm.name, bytes) else name
    hmm.accession = b"PFTEST1.1" if isinstance(hmm.accession, (bytes, type(None))) else "PFTEST1.1"
    if ga is not None:
        hmm.cutoffs.gathering = ga
    with open(path, "wb") as fh:
        hmm.write(fh)


def test_gathering_cutoffs_and_envelopes(tmp_path):
    rows = _demo()
    target = rows[0]
    domain = target["sequence"][10:120]
    hmm = tmp_path / "test.hmm"
    _write_hmm(hmm, domain, "TestDom", (30.0, 30.0))
    proteins = [Protein(accession=r["accession"], sequence=r["sequence"]) for r in rows]
    hits, families = annotate(proteins, hmm, cpus=1)
    assert families == {"PFTEST1": ("TestDom", "")} or list(families) == ["PFTEST1"]
    assert target["accession"] in hits
    ann = hits[target["accession"]][0]
    assert ann.kind == "pfam" and ann.label == "PFTEST1" and ann.score >= 30.0
    # 1-based inclusive envelope around residues 11..120
    assert 1 <= ann.start <= 15 and 115 <= ann.end <= len(target["sequence"])
    # an impossible gathering threshold removes every hit
    _write_hmm(hmm, domain, "TestDom", (1e6, 1e6))
    hits, _ = annotate(proteins, hmm, cpus=1)
    assert hits == {}


def test_hmm_without_gathering_is_an_input_error(tmp_path):
    rows = _demo(3)
    hmm = tmp_path / "noga.hmm"
    _write_hmm(hmm, rows[0]["sequence"][:80], "NoGA", None)
    with pytest.raises(InputError, match="gathering"):
        annotate([Protein(accession="A", sequence=rows[0]["sequence"])], hmm)


def test_build_with_pfam_replaces_corpus_hits(tiny_inputs, tmp_path):
    import duckdb

    from plmscope.cli import main

    chosen = tiny_inputs["chosen"]
    hmm = tmp_path / "one.hmm"
    _write_hmm(hmm, chosen[0]["sequence"][5:100], "TestDom", (25.0, 25.0))
    out = tmp_path / "pfam.duckdb"
    rc = main(["build", "--corpus", str(tiny_inputs["corpus"]), "--sae", str(tiny_inputs["sae_dir"]), "--limit", "6",
               "--pfam", str(hmm), "--out", str(out), "--device", "cpu", "--top-n", "3"])
    assert rc == 0
    con = duckdb.connect(str(out), read_only=True)
    labels = {r[0] for r in con.execute("SELECT DISTINCT label FROM annotations WHERE kind='pfam'").fetchall()}
    assert labels == {"PFTEST1"}
    assert con.execute("SELECT name FROM families WHERE family='PFTEST1'").fetchone() == ("TestDom",)
    assert con.execute("SELECT families FROM proteins WHERE accession=?", [chosen[0]["accession"]]).fetchone()[0] == ["PFTEST1"]
    con.close()
