import shutil

import pytest
from fastapi.testclient import TestClient

from plmscope.analysis import run as analyze
from plmscope.settings import Settings
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
        for classes in s["probe_latents"].values():
            for signs in classes.values():
                for r in signs["positive"][:1]:
                    assert f'/latents/{s["sae_id"]}/{r["latent"]}' in html.text
                    assert client.get(r["url"]).status_code == 200
