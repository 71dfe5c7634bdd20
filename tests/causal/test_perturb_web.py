"""The perturbation panel and the mutation scan through the real app on the session's tiny atlas
(tiny random ESM-2 + TopK SAE at its last layer), with its real models."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from plmscope.causal.effects import intervention_effect
from plmscope.causal.intervene import Edit, Intervention
from plmscope.settings import Settings
from plmscope.web.app import create_app

SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV"


@pytest.fixture(scope="module")
def live(client):
    j = client.get("/infer.json", params={"seq": SEQ, "top_k": 3}).json()
    return j["sae_id"], [t["latent"] for t in j["top_latents"][:2]], j


def test_perturb_json_matches_the_library(client, live, tiny_atlas):
    sae_id, latents, _ = live
    r = client.get("/perturb.json", params={"seq": SEQ, "latents": ",".join(map(str, latents)), "mode": "steer",
                                            "value": 2, "start": 3, "end": 12})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["start"] == 3 and j["end"] == 12 and len(j["delta_logprob"]) == len(SEQ)
    assert len(j["delta_aa"]) == 20 and len(j["steered_sequence"]) == len(SEQ)
    maxima = {e["latent"]: e["corpus_max"] for e in j["edits"]}
    assert all(e["target"] == pytest.approx(2 * maxima[e["latent"]], rel=1e-5) for e in j["edits"])
    # the same computation through the library gives the same numbers
    from plmscope.plm.esm2 import ESM2
    from plmscope.sae.io import load_sae

    plm, sae = ESM2.load(tiny_atlas.plm, "cpu"), load_sae(tiny_atlas.sae_dir).eval()
    with torch.no_grad():
        eff = intervention_effect(plm, sae, SEQ, Intervention(tuple(Edit(l, "steer", 2.0) for l in latents), 3, 12, maxima))
    assert j["total_delta_loss"] == pytest.approx(eff.total_delta_loss, abs=1e-4)
    assert j["steered_sequence"] == eff.steered_sequence
    assert j["total_delta_loss"] != 0


def test_perturb_page_is_a_permalink(client, live):
    sae_id, latents, _ = live
    params = {"seq": SEQ, "latents": str(latents[0]), "mode": "ablate"}
    html = client.get("/perturb", params=params)
    assert html.status_code == 200 and 'id="steered-sequence"' in html.text and 'id="delta-aa"' in html.text
    assert client.get("/perturb", params=params, headers={"accept": "application/json"}).status_code in (200,)
    assert client.get("/perturb").status_code == 200  # the form alone


def test_scan_json_and_page(client, live):
    sae_id, latents, _ = live
    r = client.get("/scan.json", params={"seq": SEQ, "latents": str(latents[0]), "start": 4, "end": 6})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["n_variants"] == 57 and j["positions"] == [4, 5, 6] and j["score_name"] == "masked_marginal_log_ratio"
    grid = np.array(j["grids"][0]["delta"])
    assert grid.shape == (20, 3) and np.abs(grid).max() > 0
    cut = client.get("/scan.json", params={"seq": SEQ, "latents": str(latents[0]), "start": 2, "end": 30}).json()
    assert cut["positions"] == [2, 3, 4, 5] and "plmscope scan" in cut["note"]
    html = client.get("/scan", params={"seq": SEQ, "latents": str(latents[0]), "start": 4, "end": 6}).text
    assert f'id="scan-{latents[0]}"' in html and 'id="scan-score"' in html


@pytest.mark.parametrize("path, params, status, fragment", [
    ("/perturb.json", {"seq": SEQ, "latents": "99999"}, 404, "no latent 99999"),
    ("/perturb.json", {"seq": SEQ, "latents": ","}, 422, "name 1 to"),
    ("/perturb.json", {"seq": SEQ, "latents": "1", "mode": "steer", "value": 9}, 422, "outside 0..5"),
    ("/perturb.json", {"seq": SEQ, "latents": "1", "start": 50}, 404, "select no residue"),
    ("/scan.json", {"seq": SEQ, "latents": "1", "start": 9, "end": 3}, 404, "select no residue"),
])
def test_bad_requests_say_what(client, path, params, status, fragment):
    r = client.get(path, params=params)
    assert r.status_code == status and fragment in r.json()["detail"], r.text


def test_rate_limit_and_no_model(tiny_atlas):
    app = create_app(Settings(atlas=tiny_atlas.path, device="cpu", rate_limit_per_minute=1))
    with TestClient(app) as c:
        assert c.get("/perturb.json", params={"seq": SEQ, "latents": "1"}).status_code == 200
        r = c.get("/perturb.json", params={"seq": SEQ, "latents": "2"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    with TestClient(create_app(Settings(atlas=tiny_atlas.path, load_model=False))) as c:
        assert c.get("/scan.json", params={"seq": SEQ, "latents": "1"}).status_code == 503
        assert c.get("/perturb", params={"seq": SEQ, "latents": "1"}).status_code == 503


def test_full_queue_gives_503(tiny_atlas):
    app = create_app(Settings(atlas=tiny_atlas.path, device="cpu", rate_limit_per_minute=0, infer_queue_size=1))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*[c.get("/scan.json", params={"seq": SEQ, "latents": "1", "start": i, "end": i + 2})
                                        for i in range(1, 7)])
            return [r.status_code for r in rs], [r.headers.get("Retry-After") for r in rs]

    codes, retry = asyncio.run(burst())
    assert 200 in codes and 503 in codes
    assert all(r is not None for c, r in zip(codes, retry) if c == 503)
