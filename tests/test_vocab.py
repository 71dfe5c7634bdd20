"""The shared domain facts (plmscope.vocab) and that every consumer uses the same ones: the latent
page and the automatic description quote one enrichment, flat-file features and computed secondary
structure give the same concepts, the stored activation codes round-trip, and the front end draws
with the server's colour scale."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from plmscope import vocab
from plmscope.analysis import describe
from plmscope.analysis.concepts import concept_key
from plmscope.sequences import read_proteins

from tests._paths import DEMO, REPO

ENRICHED = re.compile(r"([A-Z]) \(x([0-9.]+)\)")


@pytest.fixture(scope="module")
def analysed_client(tiny_atlas, tmp_path_factory):
    """The tiny atlas after `plmscope analyze` (descriptions written), served without models."""
    from fastapi.testclient import TestClient

    from plmscope.cli import main
    from plmscope.settings import Settings
    from plmscope.web.app import create_app

    path = tmp_path_factory.mktemp("vocab") / "analysed.duckdb"
    shutil.copyfile(tiny_atlas.path, path)
    assert main(["analyze", "--atlas", str(path), "--max-proteins", "0"]) == 0
    with TestClient(create_app(Settings(atlas=path, load_model=False))) as c:
        yield c


def test_latent_page_enrichment_is_the_description_fold(analysed_client):
    """For every latent: the amino acids the description calls enriched, with their folds, are the
    ones the latent page's enrichment chart gives (same counts, same formula)."""
    overview = analysed_client.get("/.json").json()
    sid, d_sae = overview["sae_id"], overview["saes"][0]["d_sae"]
    claims = 0
    for latent in range(d_sae):
        page = analysed_client.get(f"/latents/{sid}/{latent}.json").json()
        text = page["analysis"]["description"]
        quoted = [(aa, float(x)) for aa, x in ENRICHED.findall(text.split("enriched ", 1)[1])] if "enriched " in text else []
        chart = {e["aa"]: (2 ** e["log2_enrichment"], e["count"]) for e in page["aa_enrichment"]}
        qualifying = {aa: f for aa, (f, n) in chart.items() if f >= describe.MIN_AA_FOLD and n >= describe.MIN_AA_RESIDUES}
        if page["analysis"]["pattern"] == "dead":
            assert not quoted
            continue
        # the strongest MAX_AAS of the chart's qualifying letters (equal folds may come in any order)
        assert {aa for aa, _ in quoted} <= set(qualifying), (latent, text, qualifying)
        assert len(quoted) == min(describe.MAX_AAS, len(qualifying)), (latent, text, qualifying)
        left_out = [f for aa, f in qualifying.items() if aa not in dict(quoted)]
        if quoted and left_out:
            assert max(left_out) <= min(f for _, f in quoted) + 0.05, (latent, text, qualifying)
        for aa, fold in quoted:
            # the description prints one decimal, the page three decimals of log2
            assert abs(chart[aa][0] - fold) <= 0.05 + 1e-3 * fold, (latent, aa, fold, chart[aa])
        claims += len(quoted)
    assert claims > 0, "no latent of the tiny atlas has an enriched amino acid: the test checked nothing"


def test_aa_fold_is_finite_and_neutral_without_data():
    bg = np.full(20, 1000)
    counts = np.zeros(20, int)
    counts[3] = 30
    fold = vocab.aa_fold(counts, bg)
    assert np.isfinite(fold).all() and (fold > 0).all()
    assert fold[3] == fold.max() and fold[0] < 1
    p = vocab.AA_PSEUDO_COUNT
    assert fold[3] == pytest.approx(((30 + p) / (30 + 20 * p)) / ((1000 + p) / (bg.sum() + 20 * p)))
    assert (vocab.aa_fold(np.zeros(20), bg) == 1).all()
    assert (vocab.aa_fold(counts, np.zeros(20)) == 1).all()


@pytest.mark.parametrize("scale", [1e-3, 0.7, 13.0, 900.0])
def test_quantize_round_trip_within_max_over_510(scale):
    rng = np.random.default_rng(1)
    v = (rng.random(5000) * scale).astype(np.float32)
    v[0] = scale
    q = vocab.quantize(v, scale)
    assert q.dtype == np.uint8 and q[0] == vocab.QUANT_LEVELS and q.min() >= 0
    assert np.abs(vocab.dequantize(q, scale) - v).max() <= scale / 510 * (1 + 1e-6)


def test_quantize_per_value_scales_and_never_active_latents():
    v = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    scales = np.array([1.0, 1.0, 4.0, 0.0])  # the last latent never fired: its scale is 0
    q = vocab.quantize(v, scales)
    assert q.tolist() == [128, 255, 128, 0]
    assert vocab.quantize(np.array([7.0]), 1.0).tolist() == [255]  # above the scale clips
    assert vocab.dequantize(np.array([0, 255, 51], np.uint8), 2.0).tolist() == pytest.approx([0.0, 2.0, 0.4])


def test_flat_file_helix_strand_turn_are_secondary_structure_concepts():
    corpus = read_proteins(DEMO / "swissprot_sample.dat")
    protein = next(p for p in corpus.proteins if {"helix", "strand", "turn"} <= {a.type for a in p.annotations})
    keys = {a.type: concept_key(a.kind, a.type, a.label) for a in protein.annotations}
    assert keys["helix"] == "secondary structure:helix"
    assert keys["strand"] == "secondary structure:strand"
    assert keys["turn"] == "secondary structure:turn"
    # computed secondary structure (analysis/secondary.py) lands on the same concepts
    assert concept_key("secondary_structure", "strand", "CA rule") == keys["strand"]
    # the reader stores the names the concept code knows: no type is renamed on the way
    for p in corpus.proteins:
        for a in p.annotations:
            assert vocab.feature_name(a.type) == a.type, a


def test_feature_aliases_give_the_parser_names():
    assert concept_key("feature", "STRAND", "") == concept_key("feature", "Beta strand", "") == "secondary structure:strand"
    assert concept_key("feature", "TRANSMEM", "") == concept_key("feature", "transmembrane region", "")
    assert concept_key("feature", "Sequence conflict", "") is None
    assert concept_key("feature", "PEPTIDE", "") is None
    assert vocab.is_point_pair("DISULFID") and vocab.is_point_pair("cross-link") and not vocab.is_point_pair("helix")


def _scale_json(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="colour-scale">(.*?)</script>', html, re.S)
    assert m, "page carries no colour scale"
    return json.loads(m.group(1))


def test_pages_carry_the_servers_colour_scale(client):
    assert _scale_json(client.get("/").text) == vocab.colour_scale()
    hits = client.get("/proteins.json", params={"per_page": 500}).json()["proteins"]
    acc = next(h["accession"] for h in hits if h["has_structure"])
    html = client.get(f"/proteins/{acc}").text
    assert _scale_json(html)["stops"] == list(vocab.COLOUR_STOPS)
    # the legend under the structure is drawn from the same scale
    assert f'class="bar" style="background: {vocab.css_gradient()}"' in html


def test_plmscope_js_has_no_copy_of_the_scale():
    js = (REPO / "frontend" / "static" / "plmscope.js").read_text().lower()
    for colour in (*vocab.COLOUR_STOPS, vocab.ZERO_COLOUR, vocab.UNMAPPED_COLOUR):
        assert colour[1:].lower() not in js, colour
    assert "getelementbyid('colour-scale')" in js
