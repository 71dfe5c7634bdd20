import shutil
from dataclasses import asdict

import pytest
from fastapi.testclient import TestClient

from plmscope.analysis import run as analyze
from plmscope.settings import Settings
from plmscope.store.analysis_reads import (ClassLatents, PatternCount, ProbeComparison, ProbeLatent, ProbeScore,
                                           SaeAnalysis)
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
