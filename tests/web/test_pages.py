"""Pages, JSON twins, CSV exports, 404/409 handling against the real tiny atlas and models."""

from __future__ import annotations

import csv
import io
import re

import pytest


@pytest.fixture(scope="module")
def overview(client):
    r = client.get("/.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def sae_id(overview):
    return overview["sae_id"]


@pytest.fixture(scope="module")
def latent(overview):
    return overview["latents"][0]["latent"]


@pytest.fixture(scope="module")
def structured_accession(client):
    hits = client.get("/proteins.json", params={"per_page": 500}).json()["proteins"]
    return next(h["accession"] for h in hits if h["has_structure"])


def test_overview_page_and_twin(client, overview, sae_id):
    html = client.get("/").text
    assert "latent-table" in html and sae_id in html
    assert overview["atlas_id"] in html  # links carry the atlas id
    assert overview["total"] == len(client.get("/.json", params={"per_page": 500}).json()["latents"])
    assert overview["saes"][0]["d_sae"] == 128
    assert client.get("/", params={"format": "json"}).json() == overview


def test_overview_filters_sort_paging(client, overview, sae_id):
    fam = next(r["top_family"] for r in overview["latents"] if r["top_family"])
    j = client.get("/.json", params={"family": fam}).json()
    assert 1 <= j["total"] <= overview["total"] and j["query"]["family"] == fam
    j = client.get("/.json", params={"sort": "max_act", "desc": "false", "per_page": 5, "page": 2}).json()
    maxes = [r["max_act"] for r in j["latents"]]
    assert len(maxes) == 5 and maxes == sorted(maxes)
    assert client.get("/.json", params={"sort": "nope"}).status_code == 422
    assert client.get("/.json", params={"per_page": 100000}).status_code == 422
    assert client.get("/", params={"q": "<script>alert(1)</script>"}).text.count("<script>alert(1)") == 0


def test_overview_csv(client, overview):
    for url in ("/.csv", "/?format=csv"):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert len(rows) == overview["total"]  # the export holds every matching row, not one page
        assert {"latent", "max_act", "category", "description"} <= set(rows[0])


def test_random_latent_redirect(client, sae_id, overview):
    r = client.get("/random", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"].startswith(f"/latents/{sae_id}/") and f"atlas={overview['atlas_id']}" in r.headers["location"]
    assert client.get(r.headers["location"]).status_code == 200


def test_latent_page_and_twin(client, sae_id, latent):
    j = client.get(f"/latents/{sae_id}/{latent}.json").json()
    assert j["latent"] == latent and j["top_examples"] and j["bins"]
    ex = j["top_examples"][0]
    assert len(ex["activations"]) == min(ex["length"], 1022) and ex["label"]
    html = client.get(f"/latents/{sae_id}/{latent}").text
    for marker in ('id="histogram"', "<svg", 'class="hm-row"', "details class=\"bin\"", 'id="aa-enrichment"',
                   "3Dmol-2.5.5.min.js", ex["accession"]):
        assert marker in html
    assert "cdn" not in html.lower()
    r = client.get(f"/latents/{sae_id}/{latent}.csv")
    assert r.status_code == 200 and ex["accession"] in r.text


def test_json_twin_is_the_page_models_json(client, tiny_atlas, sae_id, latent):
    # the twins are serialised by pydantic in one pass (routes.common.model_json): the same document
    # as the json module's encoding of model_dump(mode="json"), and a valid one
    import json

    from fastapi.responses import JSONResponse

    from plmscope.store.reader import AtlasReader
    from plmscope.web.routes.pages import build_latent

    reader = AtlasReader(tiny_atlas.path)
    try:
        m = build_latent(reader, reader.sae(sae_id), latent)
    finally:
        reader.close()
    r = client.get(f"/latents/{sae_id}/{latent}.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert json.loads(r.content) == json.loads(JSONResponse(m.model_dump(mode="json")).body)


def test_latent_page_structure_embedded(client, sae_id, overview):
    # some latent of the tiny atlas has an example with a structure: its page embeds the chain for 3Dmol
    for row in overview["latents"]:
        j = client.get(f"/latents/{sae_id}/{row['latent']}.json").json()
        acc = next((e["accession"] for e in j["top_examples"] if e["has_structure"]), None)
        if acc:
            html = client.get(f"/latents/{sae_id}/{row['latent']}").text
            assert 'id="structures-data"' in html and acc in html and "ATOM" in html
            return
    pytest.fail("no latent example with a structure in the tiny atlas")


def test_protein_page_and_twin(client, sae_id, structured_accession):
    j = client.get(f"/proteins/{structured_accession}.json").json()
    assert j["accession"] == structured_accession and j["label"]
    assert j["structures"] and j["structures"][0]["content"]
    assert j["top_latents"] and j["heatmap"]["source"] == "atlas"
    assert len(j["heatmap"]["activations"]) == j["length"] or j["truncated_to"]
    html = client.get(f"/proteins/{structured_accession}").text
    assert 'class="hm-row"' in html and "structures-data" in html
    assert client.get(f"/proteins/{structured_accession}.csv").status_code == 200


def test_protein_heatmap_live_when_not_stored(client, sae_id, structured_accession):
    j = client.get(f"/proteins/{structured_accession}.json").json()
    stored = {t["latent"] for t in j["top_latents"]}
    lat = next(i for i in range(128) if i not in stored)
    r = client.get(f"/proteins/{structured_accession}.json", params={"latent": lat}).json()
    hm = r["heatmap"]
    assert hm["latent"] == lat and hm["source"] in ("atlas", "live")  # stored as an example, or computed now
    assert len(hm["activations"]) == min(r["length"], 1022)
    assert client.get(f"/proteins/{structured_accession}.json", params={"latent": 999}).status_code == 404


def test_stored_and_live_activations_agree(client, sae_id, structured_accession):
    """The atlas's stored uint8 vector and a live run of the same models agree within quantisation."""
    p = client.get(f"/proteins/{structured_accession}.json").json()
    top = p["top_latents"][0]
    stored = p["heatmap"]["activations"]
    live = client.post("/api/infer", json={"sequence": p["sequence"][:1022], "latents": [top["latent"]]}).json()
    vec = live["heatmaps"][0]["activations"]
    scale = client.get(f"/latents/{sae_id}/{top['latent']}.json").json()["stats"]["max_act"]
    assert max(abs(a - b) for a, b in zip(stored, vec)) <= scale / 510 + 2e-3


def test_proteins_without_name_have_a_label(client):
    hits = client.get("/proteins.json", params={"per_page": 500}).json()["proteins"]
    unnamed = [h for h in hits if not h["protein_name"] and not h["entry_name"]]
    assert unnamed and all(h["label"] for h in unnamed)
    html = client.get(f"/proteins/{unnamed[0]['accession']}").text
    assert unnamed[0]["label"].split(",")[0].split(" ·")[0] in html


def test_protein_search(client, structured_accession):
    j = client.get("/proteins.json", params={"q": structured_accession.lower()}).json()
    assert j["proteins"][0]["accession"] == structured_accession
    assert client.get("/proteins.csv", params={"q": structured_accession}).text.count(structured_accession) >= 1
    assert "protein-table" in client.get("/proteins", params={"q": "x"}).text


@pytest.mark.parametrize("path", ["/latents/{sae}/100000", "/latents/{sae}/100000.json", "/latents/nosuch/1",
                                  "/proteins/NOPE", "/proteins/NOPE.json", "/nowhere", "/static/../pyproject.toml",
                                  "/static/%2e%2e/%2e%2e/pyproject.toml"])
def test_not_found(client, sae_id, path):
    r = client.get(path.format(sae=sae_id))
    assert r.status_code == 404
    if path.endswith(".json"):
        assert r.json()["status"] == 404 and r.json()["detail"]
    elif not path.startswith("/static"):
        assert "Back to the latent table" in r.text  # a way back


def test_atlas_id_mismatch(client, overview, sae_id, latent):
    good = client.get(f"/latents/{sae_id}/{latent}", params={"atlas": overview["atlas_id"]})
    assert good.status_code == 200
    bad = client.get(f"/latents/{sae_id}/{latent}", params={"atlas": "0123456789abcdef", "align": "1"})
    assert bad.status_code == 409
    assert "another atlas" in bad.text.lower() or "made for atlas build" in bad.text
    assert f"/latents/{sae_id}/{latent}?align=1" in bad.text  # offers the same view on this atlas
    j = client.get("/.json", params={"atlas": "0123456789abcdef"})
    assert j.status_code == 409 and "0123456789abcdef" in j.json()["detail"]


def test_health(client, overview):
    h = client.get("/health").json()
    assert h == client.get("/health.json").json()
    assert h["status"] == "ok" and h["atlas_open"] and h["model_loaded"] and h["device"] == "cpu"
    assert h["atlas_id"] == overview["atlas_id"]


def test_openapi(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/infer", "/.json", "/latents/{sae_id}/{latent}.json", "/proteins/{accession}.json", "/health"):
        assert path in spec["paths"], path
    assert "InferResponse" in spec["components"]["schemas"]


def test_no_cors_by_default(client):
    r = client.get("/.json", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_static_vendor_served(client):
    r = client.get("/static/vendor/3Dmol-2.5.5.min.js")
    assert r.status_code == 200 and len(r.content) > 100_000
    assert client.get("/static/vendor/3Dmol-2.5.5.LICENSE").status_code == 200


HM_ROW = re.compile(r'<div class="hm-row" data-acc="([^"]*)" data-seq="([^"]*)" data-maxpos="([^"]*)"\s+'
                    r'data-scale="([^"]*)" data-values="([^"]*)"')


def _row(html: str) -> tuple[str, str, int, float, list[float]]:
    acc, seq, max_pos, scale, values = HM_ROW.search(html).groups()
    return acc, seq, int(max_pos), float(scale), [float(v) for v in values.split(",")]


def test_heatmaps_drawn_as_the_twins_report_them(client, sae_id, latent, structured_accession):
    """Latent examples, the protein page and live inference draw what one assembler built."""
    lj = client.get(f"/latents/{sae_id}/{latent}.json").json()
    ex = lj["top_examples"][0]
    assert _row(client.get(f"/latents/{sae_id}/{latent}").text) == (
        ex["accession"], ex["sequence"][: len(ex["activations"])], ex["max_pos"], lj["stats"]["max_act"], ex["activations"])

    pj = client.get(f"/proteins/{structured_accession}.json").json()
    hm = pj["heatmap"]
    assert hm["residues"] == pj["sequence"][: len(hm["activations"])] and hm["scale"] == hm["max_act"] > 0
    assert _row(client.get(f"/proteins/{structured_accession}").text) == (
        structured_accession, hm["residues"], hm["max_pos"], hm["scale"], hm["activations"])

    params = {"seq": pj["sequence"][:300], "latents": str(hm["latent"])}
    live = client.get("/infer.json", params=params).json()["heatmaps"][0]
    assert live["residues"] == pj["sequence"][:300] and live["source"] == "live"
    assert _row(client.get("/infer", params=params).text) == (
        "query", live["residues"], live["max_pos"] or 1, live["scale"], live["activations"])


@pytest.mark.parametrize("db_threads,expected", [(1, 1), (2, 2)])
def test_served_atlas_uses_the_configured_duckdb_threads(tiny_atlas, db_threads, expected):
    from fastapi.testclient import TestClient

    from plmscope.settings import Settings
    from plmscope.web.app import create_app

    app = create_app(Settings(atlas=tiny_atlas.path, load_model=False, db_threads=db_threads))
    with TestClient(app) as c:
        assert c.get("/.json").status_code == 200
        # what the reader's own connection reports
        assert app.state.reader._cur().execute("SELECT current_setting('threads')").fetchone()[0] == expected
