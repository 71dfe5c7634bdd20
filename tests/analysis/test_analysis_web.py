import shutil
from dataclasses import asdict
from html import unescape

import pytest
from fastapi.testclient import TestClient

from plmscope.analysis import run as analyze
from plmscope.settings import Settings
from plmscope.store import analysis_writes
from plmscope.store.analysis_reads import (
    ClassLatents,
    ConceptCoverage,
    ConceptPair,
    PatternCount,
    ProbeComparison,
    ProbeLatent,
    ProbeScore,
    SaeAnalysis,
)
from plmscope.store.reader import AtlasReader
from plmscope.web.app import create_app


@pytest.fixture(scope="module")
def analysed(mini_atlas, tmp_path_factory):
    path = tmp_path_factory.mktemp("web") / "analysed.duckdb"
    shutil.copyfile(mini_atlas, path)
    import argparse

    p = argparse.ArgumentParser()
    analyze.add_arguments(p)
    analyze.run(p.parse_args(["--atlas", str(path), "--max-proteins", "40"]))
    return path


def test_analysis_page_and_json_twin(analysed):
    app = create_app(Settings(atlas=analysed, load_model=False))
    with TestClient(app) as client:
        j = client.get("/analysis.json")
        assert j.status_code == 200
        data = j.json()
        assert data["has_analysis"] and data["saes"][0]["analyzed"]
        s = data["saes"][0]
        assert sum(p["n"] for p in s["patterns"]) == s["d_sae"]
        html = client.get("/analysis")
        assert html.status_code == 200
        assert "Family specificity" in html.text and s["sae_id"] in html.text
        assert "SAE vs raw pLM at equal pooling" in html.text and "McNemar exact p" in html.text
        assert "majority class" in html.text and "mean + max" in html.text
        for classes in s["probe_latents"].values():
            for signs in classes.values():
                for r in signs["positive"][:1]:
                    assert f'/latents/{s["sae_id"]}/{r["latent"]}' in html.text
                    assert client.get(r["url"]).status_code == 200


def test_reader_gives_the_page_typed_and_the_route_adds_only_urls(analysed):
    reader = AtlasReader(analysed)
    try:
        page = reader.analysis()
    finally:
        reader.close()
    assert page.has_analysis and page.atlas_id == reader.atlas_id
    (sae,) = page.saes
    assert isinstance(sae, SaeAnalysis) and sae.analyzed
    assert all(isinstance(p, PatternCount) for p in sae.patterns)
    assert sum(p.n for p in sae.patterns) == sae.d_sae == sae.summary["d_sae"]
    assert [p.features for p in sae.probes] == ["sae_mean", "raw_mean", "sae_mean_max", "raw_mean_max", "majority"]
    assert all(isinstance(p, ProbeScore) and 0 <= p.accuracy_lo <= p.accuracy <= p.accuracy_hi <= 1 for p in sae.probes)
    assert all((p.c is None) == (p.source == "majority") for p in sae.probes)
    assert [c.pooling for c in sae.probe_comparisons] == ["mean", "mean_max"]
    assert all(isinstance(c, ProbeComparison) and c.diff_lo <= c.diff <= c.diff_hi for c in sae.probe_comparisons)
    assert set(sae.probe_latents) == {"location:sae_mean", "location:sae_mean_max"}
    for classes in sae.probe_latents.values():
        for latents in classes.values():
            assert isinstance(latents, ClassLatents) and latents.positive
            assert all(isinstance(r, ProbeLatent) and r.weight > 0 for r in latents.positive)
            assert all(r.weight < 0 for r in latents.negative)
            assert [r.rank for r in latents.positive] == list(range(len(latents.positive)))
            # each latent comes with its evidence: held-out activity, density, the analysis' description
            for r in latents.positive + latents.negative:
                assert 0 <= r.frac_class <= 1 and 0 <= r.frac_rest <= 1 and 0 < r.density <= 1
                assert r.description and r.pattern

    with TestClient(create_app(Settings(atlas=analysed, load_model=False))) as client:
        data = client.get("/analysis.json").json()
    url_keys = {"url", "best_latent_url", "latents_url"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in url_keys}
        return [strip(v) for v in x] if isinstance(x, list) else x

    assert strip(data) == strip(asdict(page))


def test_concept_counts_are_interplms_and_shown(analysed):
    with TestClient(create_app(Settings(atlas=analysed, load_model=False))) as client:
        c = client.get("/analysis.json").json()["saes"][0]["summary"]["concepts"]
        html = unescape(client.get("/analysis").text)
    assert {"n_associated_pairs", "n_associated_latents", "n_associated_concepts", "n_concepts_tested",
            "n_concepts_scored", "n_pairs_passing_validation", "association_rule", "bootstrap", "normalisation"} <= set(c)
    assert c["n_associated_pairs"] <= c["n_pairs_passing_validation"] and c["n_concepts_tested"] <= c["n_concepts_scored"]
    assert "validation F1 > 0.5 and test F1 > 0.5" in c["association_rule"] and c["bootstrap"]["resamples"] == 200
    assert "InterPLM's rule" in html and "associated pairs" in html and "outside the test split's clusters" in html


@pytest.fixture()
def with_concept_rows(analysed, tmp_path):
    """The analysed atlas plus two associated pairs of one concept, written by analyze's own writer:
    latent 0 wins on validation F1, latent 1 on test F1."""
    import duckdb
    import numpy as np

    path = tmp_path / "pairs.duckdb"
    shutil.copyfile(analysed, path)
    con = duckdb.connect(str(path))
    sid = con.execute("SELECT sae_id FROM saes").fetchall()[0][0]
    con.execute("DELETE FROM latent_concepts")
    f = np.array
    analysis_writes.write_latent_concepts(con, sid, {
        "latent": f([0, 1], np.int32), "concept": f(["feature:x", "feature:x"], object), "level": f(["region"] * 2, object),
        "threshold": f([0.5, 0.15], np.float32), "norm_max": f([2.0, 3.0], np.float32),
        "val_precision": f([0.9, 0.7]), "val_recall": f([0.9, 0.7]), "val_f1": f([0.9, 0.7]),
        "test_precision": f([0.6, 0.95]), "test_recall": f([0.6, 0.95]), "test_f1": f([0.6, 0.95]),
        "test_f1_lo": f([0.51, 0.9]), "test_f1_hi": f([0.7, 0.99]), "n_val": f([12, 12], np.int32),
        "n_test": f([11, 11], np.int32), "associated": f([True, True])})
    con.close()
    return path, sid


def test_best_latent_of_a_concept_is_chosen_by_validation_f1(with_concept_rows):
    path, sid = with_concept_rows
    reader = AtlasReader(path)
    try:
        (cov,) = reader.analysis().saes[0].concepts
        pairs = reader.latent(sid, 1)["concepts"]
    finally:
        reader.close()
    assert isinstance(cov, ConceptCoverage)
    assert (cov.best_latent, cov.best_val_f1, cov.best_test_f1) == (0, 0.9, 0.6)  # not latent 1's test F1 0.95
    assert (cov.best_test_f1_lo, cov.best_test_f1_hi, cov.n_val, cov.n_test, cov.n_latents) == (0.51, 0.7, 12, 11, 2)
    assert [ConceptPair(**p).test_f1_hi for p in pairs] == [0.99]
    with TestClient(create_app(Settings(atlas=path, load_model=False))) as client:
        html = client.get("/analysis").text
        latent = client.get(f"/latents/{sid}/1").text
    assert "<td>0.6 [0.51, 0.7]</td>" in html  # the page's numbers (3 significant digits)
    assert "0.95 [0.9, 0.99]" in latent and "12 / 11" in latent and "0.15 × 3" in latent
