"""Issue 16, items 3-5: DSSP secondary structure, concept sources, the paper's findings per layer,
and the evidence-first latent table; on a real atlas with two SAEs on different UniRep-64 layers
(built and analysed through the real commands), each number checked against an independent
computation from the atlas's rows or on a small constructed case."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pytest
from fastapi.testclient import TestClient

from plmscope.analysis import findings, secondary
from plmscope.analysis import run as analyze
from plmscope.settings import Settings
from plmscope.store import analysis_writes
from plmscope.store.reader import DEFAULT_SORT, DENSE_PROTEINS, AtlasReader
from plmscope.web.app import create_app
from tests._paths import DEMO

from .conftest import STANDARD

PER_CLASS = 20


def _nls_rows() -> dict[str, list[dict]]:
    out = defaultdict(list)
    with open(DEMO / "nls.tsv") as fh:
        for r in csv.DictReader(fh, delimiter="\t"):
            out[r["accession"]].append({"kind": "nls", "type": "NLS", "label": r["motif_type"],
                                        "start": int(r["start"]), "end": int(r["end"])})
    return out


def _rows(nls: dict) -> list[dict]:
    """20 single-location proteins of each of three classes (<= 300 residues); nucleus proteins
    with an NLS motif first, so the nucleus probe and the NLS test have something to work on."""
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t")
                if int(r["length"]) <= 300 and set(r["sequence"]) <= STANDARD]
    out = []
    for loc in ("nucleus", "cytoplasm", "plasma membrane"):
        of = sorted((r for r in rows if r["location"] == loc), key=lambda r: (r["accession"] not in nls, r["accession"]))
        out += of[:PER_CLASS]
    return out


@pytest.fixture(scope="module")
def layers_atlas(tmp_path_factory) -> Path:
    """60 demo proteins (20 nucleus, 20 cytoplasm, 20 membrane; NLS motifs from nls.tsv attached as
    annotations) built with two seeded TopK SAEs on UniRep-64 layers 1 and 2, then analysed."""
    import torch

    from plmscope.cli import main
    from plmscope.sae.io import save_sae
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    root = tmp_path_factory.mktemp("layers")
    nls = _nls_rows()
    rows = _rows(nls)
    corpus = root / "corpus.tsv"
    with open(corpus, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) + ["annotations"], delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "annotations": json.dumps(nls.get(r["accession"], []))})
    saes = []
    for layer in (1, 2):
        cfg = make_cfg(plm="unirep-64", layer=layer, d_in=64, d_sae=48, architecture="topk", k=6)
        save_sae(SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(layer)), root / f"sae{layer}")
        saes += ["--sae", str(root / f"sae{layer}")]
    out = root / "layers.duckdb"
    assert main(["build", "--corpus", str(corpus), *saes, "--out", str(out), "--families", str(DEMO / "pfam_families.tsv"),
                 "--top-n", "5", "--checkpoint-every", "0", "--device", "cpu"]) == 0
    assert main(["analyze", "--atlas", str(out), "--max-proteins", "80", "--sweep", str(root / "no-sweep.json")]) == 0
    return out


def _q(path, sql, params=()):
    con = duckdb.connect(str(path), read_only=True)
    try:
        cur = con.execute(sql, list(params))
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        con.close()


# ---------------------------------------------------------------- findings over two layers
def test_findings_per_layer_match_the_atlas_rows(layers_atlas):
    found = {r["claim"]: r for r in _q(layers_atlas, "SELECT * FROM findings")}
    assert list(found) and set(found) == {"family_middle", "point_later", "nls_probe", "specific_and_general",
                                          "secondary_structure", "dictionary_size"}
    vals = _q(layers_atlas, "SELECT * FROM finding_values")
    saes = {r["layer"]: r["sae_id"] for r in _q(layers_atlas, "SELECT sae_id, layer FROM saes")}
    for layer, sid in saes.items():
        rows = _q(layers_atlas, "SELECT pattern, family_specific FROM latent_analysis WHERE sae_id = ?", [sid])
        summary = json.loads(_q(layers_atlas, "SELECT summary FROM analysis_summary WHERE sae_id = ?", [sid])[0]["summary"])
        n_live = summary["family"]["n_live"]
        n_point = sum(r["pattern"] == "point" for r in rows)
        n_spec = sum(bool(r["family_specific"]) for r in rows if r["pattern"] != "dead")
        point = next(v for v in vals if v["claim"] == "point_later" and v["layer"] == layer)
        spec = next(v for v in vals if v["claim"] == "family_middle" and v["layer"] == layer)
        assert (point["k"], point["n"]) == (n_point, n_live)
        assert (spec["k"], spec["n"]) == (n_spec, n_live)
        assert point["value"] == pytest.approx(n_point / n_live)
        assert point["lo"] <= point["value"] <= point["hi"]
    # two layers: the middle-layer claim cannot be tested, the later-layer one can
    assert found["family_middle"]["verdict"] == findings.NOT_ENOUGH
    assert "3 analysed layers" in found["family_middle"]["reason"]
    assert found["point_later"]["verdict"] in (findings.REPRODUCED, findings.NOT_REPRODUCED, findings.NOT_ENOUGH)
    assert found["dictionary_size"]["verdict"] == findings.NOT_TESTED
    assert found["dictionary_size"]["reason"] == "no sweep recorded"


def test_nls_peaks_and_base_rate_match_an_independent_count(layers_atlas):
    nls = defaultdict(list)
    for r in _q(layers_atlas, "SELECT accession, start, \"end\" FROM annotations WHERE kind = 'nls'"):
        nls[r["accession"]].append((r["start"], r["end"]))
    lengths = {r["accession"]: r["truncated_to"] or r["length"] for r in _q(layers_atlas, "SELECT * FROM proteins")}
    covered = sum(len({p for s, e in spans for p in range(s, min(e, lengths[a]) + 1)}) for a, spans in nls.items())
    details = json.loads(_q(layers_atlas, "SELECT details FROM findings WHERE claim = 'nls_probe'")[0]["details"])
    assert covered > 0
    assert (details["base_nls_residues"], details["base_residues"]) == (covered, sum(lengths.values()))
    for sae in _q(layers_atlas, "SELECT sae_id, layer FROM saes"):
        lat = {r["latent"] for r in _q(layers_atlas, "SELECT latent FROM probe_latents WHERE sae_id = ? AND class = 'nucleus' "
                                                     "AND sign = 'positive' AND features = 'sae_mean_max'", [sae["sae_id"]])}
        peaks = [(r["accession"], r["max_pos"]) for r in _q(
            layers_atlas, "SELECT latent, accession, max_pos, rank FROM latent_examples WHERE sae_id = ? AND kind = 'top'",
            [sae["sae_id"]]) if r["latent"] in lat and r["rank"] < analyze.TOP_EXAMPLES]
        hits = sum(any(s <= pos <= e for s, e in nls.get(acc, [])) for acc, pos in peaks)
        v = _q(layers_atlas, "SELECT * FROM finding_values WHERE claim = 'nls_probe' AND layer = ?", [sae["layer"]])[0]
        assert lat, "the nucleus class has top positive latents"
        assert (v["k"], v["n"]) == (hits, len(peaks))


# ---------------------------------------------------------------- the tests on constructed cases
def _wilson(k, n, z=1.959963984540054):
    # the textbook formula, written out independently of scipy
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _layer(layer, n_live, spec=0, gen=0, point=0, peaks=0, hits=0):
    return findings.LayerInputs(layer=layer, sae_ids=[f"s{layer}"], n_live=n_live, n_specific=spec, n_general=gen,
                                n_point=point, nls_peaks=peaks, nls_hits=hits)


def test_family_middle_reproduced_and_not_on_constructed_layers():
    # middle layers 1 and 2: 60 + 50 of 200 specific; ends 0 and 3: 10 + 12 of 200
    layers = [_layer(0, 100, spec=10), _layer(1, 100, spec=60), _layer(2, 100, spec=50), _layer(3, 100, spec=12)]
    f = findings.family_middle(layers)
    assert f.verdict == findings.REPRODUCED
    v1 = next(v for v in f.values if v.layer == 1)
    assert (v1.lo, v1.hi) == pytest.approx(_wilson(60, 100), abs=1e-9)
    # the sample odds ratio (110 * 178) / (90 * 22) lies inside the exact interval
    lo, hi = f.details["odds_ratio_ci"]
    assert lo > 1 and lo < (110 * 178) / (90 * 22) < hi
    flipped = findings.family_middle([_layer(0, 100, spec=60), _layer(1, 100, spec=10), _layer(2, 100, spec=12),
                                      _layer(3, 100, spec=50)])
    assert flipped.verdict == findings.NOT_REPRODUCED


def test_point_later_and_nls_on_constructed_layers():
    assert findings.point_later([_layer(0, 200, point=5), _layer(1, 200, point=40)]).verdict == findings.REPRODUCED
    assert findings.point_later([_layer(0, 200, point=40), _layer(1, 200, point=40)]).verdict == findings.NOT_REPRODUCED
    assert findings.point_later([_layer(0, 10, point=1), _layer(1, 10, point=5)]).verdict == findings.NOT_ENOUGH
    # base rate 1 %: 12 of 40 peaks inside NLS is far above it; 1 of 40 is not
    f = findings.nls_probe([_layer(1, 50, peaks=40, hits=12), _layer(2, 50, peaks=40, hits=1)], 100, 10_000)
    assert f.verdict == findings.REPRODUCED
    assert [round(v.value, 3) for v in f.values] == [0.3, 0.025]
    assert f.details["base_rate"] == pytest.approx(0.01)
    assert findings.nls_probe([_layer(1, 50, peaks=40, hits=1)], 100, 10_000).verdict == findings.NOT_REPRODUCED
    assert findings.nls_probe([_layer(1, 50, peaks=40, hits=12)], 0, 10_000).verdict == findings.NOT_ENOUGH


def test_secondary_structure_and_specific_general_verdicts():
    a = _layer(1, 50, spec=3, gen=20)
    a.secondary = {"helix": (0.62, 0.5, 0.7, 2, True), "strand": (0.3, 0.2, 0.4, 0, True)}
    b = _layer(2, 50, spec=0, gen=30)
    b.secondary = {"helix": (0.4, 0.3, 0.5, 0, True)}
    ss = findings.secondary_structure([a, b])
    assert ss.verdict == findings.REPRODUCED and "helix in layer 1" in ss.reason
    b2 = _layer(2, 50)
    b2.secondary = {"helix": (0.4, 0.3, 0.5, 0, True)}
    assert findings.secondary_structure([b2]).verdict == findings.NOT_REPRODUCED
    assert findings.secondary_structure([_layer(1, 50)]).verdict == findings.NOT_ENOUGH
    assert findings.specific_and_general([a, b]).verdict == findings.REPRODUCED
    assert findings.specific_and_general([b]).verdict == findings.NOT_REPRODUCED


def test_sweep_file_is_read_and_checked(tmp_path):
    assert findings.read_sweep(None) is None and findings.read_sweep(tmp_path / "absent.json") is None
    rows = [{"layer": 1, "d_sae": 4096, "k": 32, "explained_variance": 0.8, "splice_delta_nats": 0.01,
             "dead_fraction": 0.1, "associated_concepts": 12},
            {"layer": 1, "d_sae": 2048, "k": 16, "explained_variance": 0.7, "splice_delta_nats": 0.02,
             "dead_fraction": 0.05, "associated_concepts": None}]
    (tmp_path / "sweep.json").write_text(json.dumps(rows))
    f = findings.dictionary_size(findings.read_sweep(tmp_path / "sweep.json"), "sweep.json")
    assert f.verdict == findings.MEASURED and [r["d_sae"] for r in f.details["sweep"]] == [2048, 4096]
    assert "12 at layer 1, d_sae 4096, k 32" in f.reason
    (tmp_path / "bad.json").write_text(json.dumps([{"layer": 1}]))
    with pytest.raises(Exception, match="row 0 lacks d_sae"):
        findings.read_sweep(tmp_path / "bad.json")


# ---------------------------------------------------------------- pages
def test_analysis_page_shows_findings_charts_and_sweep(layers_atlas, tmp_path):
    app = create_app(Settings(atlas=layers_atlas, load_model=False))
    with TestClient(app) as client:
        html = client.get("/analysis").text
        data = client.get("/analysis.json").json()
        schema = client.get("/openapi.json").json()
    assert 'id="findings-table"' in html and 'id="no-sweep"' in html
    assert 'class="finding-chart"' in html and "layer 1" in html and "layer 2" in html
    claims = [f["claim"] for f in data["findings"]]
    assert claims[:2] == ["family_middle", "point_later"]
    point = next(f for f in data["findings"] if f["claim"] == "point_later")
    assert sorted(v["layer"] for v in point["values"]) == [1, 2]
    assert "AnalysisDoc" in schema["components"]["schemas"] and "FindingModel" in schema["components"]["schemas"]
    # concept sources: NLS motifs from the corpus, Pfam domains, with per-split counts
    src = {c["concept"]: c for c in data["saes"][0]["concept_sources"]}
    assert src["nls:nuclear localization signal"]["sources"] == {"NLS motifs": src["nls:nuclear localization signal"]["n_regions"]}
    assert any(k.startswith("pfam:") and v["sources"] == {"Pfam domains": v["n_regions"]} for k, v in src.items())
    assert 'id="concept-sources-' in html

    # with a sweep recorded, re-running the findings shows its rows
    path = tmp_path / "with_sweep.duckdb"
    shutil.copyfile(layers_atlas, path)
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"layer": 2, "d_sae": 96, "k": 8, "explained_variance": 0.5, "splice_delta_nats": 0.03,
                                  "dead_fraction": 0.2, "associated_concepts": 3}]))
    con = analysis_writes.open_for_writing(path, path)
    try:
        analyze.paper_findings(con, analyze.AnalyzeSettings(atlas=path, sweep=sweep))
        analysis_writes.checkpoint(con)
    finally:
        con.close()
    with TestClient(create_app(Settings(atlas=path, load_model=False))) as client:
        html = client.get("/analysis").text
    assert 'id="sweep-table"' in html and "no-sweep" not in html and ">96<" in html


def _tier(r) -> int:
    # the documented evidence tiers, computed here from the row
    if r["concept"] is not None:
        return 4
    if r["family_specific"]:
        return 3
    if r["frac_proteins"] >= DENSE_PROTEINS or r["category"] == "whole":
        return 0
    if r["category"] in ("point", "short_motif", "long_motif", "periodic") or "enriched " in (r["description"] or ""):
        return 2
    return 1


def test_latent_table_opens_on_evidence_and_layers_side_by_side(layers_atlas):
    assert DEFAULT_SORT == "evidence"
    reader = AtlasReader(layers_atlas)
    try:
        sid = reader.overview()["saes"][0]["sae_id"]
        rows, total = reader.latent_list(sid, limit=500)
    finally:
        reader.close()
    tiers = [_tier(r) for r in rows]
    assert tiers == sorted(tiers, reverse=True) and len(set(tiers)) > 1
    with TestClient(create_app(Settings(atlas=layers_atlas, load_model=False))) as client:
        page = client.get("/.json", params={"sae": sid}).json()
        html = client.get("/", params={"sae": sid}).text
    assert page["query"]["sort"] == "evidence"
    assert [r["latent"] for r in page["latents"]] == [r["latent"] for r in rows[:50]]
    assert html.count('data-sae="') == 2 and 'id="layer-cards"' in html


# ---------------------------------------------------------------- DSSP
def test_dssp_on_a_committed_demo_structure_matches_dssp_on_the_file(tmp_path):
    """3gfsA (full backbone): the atlas's stored chain text through ``secondary.segments`` gives the
    states Biopython's DSSP wrapper reads from mkdssp on the original file."""
    from Bio.PDB import PDBParser
    from Bio.PDB.DSSP import DSSP

    from plmscope.atlas.structures import StructureJob, load_structure

    exe = secondary.dssp_executable()
    assert exe, secondary.MISSING_DSSP
    acc, name = "O07529", "MDAnalysisTests__3gfsA.pdb.gz"
    with gzip.open(DEMO / "structures" / name, "rt") as fh:
        text = fh.read()
    seq = next(r["sequence"] for r in csv.DictReader(gzip.open(DEMO / "proteins.tsv.gz", "rt"), delimiter="\t")
               if r["accession"] == acc)
    rec = load_structure(StructureJob(accession=acc, path=DEMO / "structures" / name, chain="A", source="demo",
                                      record="test"), seq)
    residue_map = {(num, ins): pos for pos, num, ins, _ in rec.residues}
    method, segs = secondary.segments(rec.content, residue_map, exe)
    assert method == secondary.METHOD_DSSP
    ours = {p: name for name, s, e in segs for p in range(s, e + 1)}
    # independently: Biopython's DSSP class on the original file (with a HEADER line mkdssp 4 needs)
    src = tmp_path / "orig.pdb"
    src.write_text("HEADER    TEST\n" + text)
    model = PDBParser(QUIET=True).get_structure("x", str(src))[0]
    theirs = {}
    three = {"H": "helix", "G": "helix", "I": "helix", "E": "strand", "B": "strand", "T": "turn"}
    for (chain, (_, num, ins)), row in DSSP(model, str(src), dssp=exe).property_dict.items():
        if chain == "A" and row[2] in three and (num, ins.strip()) in residue_map:
            theirs[residue_map[(num, ins.strip())]] = three[row[2]]
    assert ours == theirs and {"helix", "strand", "turn"} <= set(ours.values())


def test_ca_only_trace_uses_the_ca_rule():
    lines = [ln for ln in gzip.open(DEMO / "structures" / "MDAnalysisTests__3gfsA.pdb.gz", "rt").read().splitlines()
             if ln.startswith("ATOM") and ln[12:16].strip() == "CA"]
    method, segs = secondary.segments("\n".join(lines) + "\n", {(int(ln[22:26]), ""): int(ln[22:26]) for ln in lines},
                                      secondary.dssp_executable())
    assert method == secondary.METHOD_CA and segs and {s[0] for s in segs} <= {"helix", "strand"}
