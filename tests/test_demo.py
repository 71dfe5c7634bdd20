"""The offline demo: the committed SAE is what `plmscope demo --retrain-sae` makes from the committed
corpus, and the demo pipeline (corpus -> build -> analyze -> serve) works end to end in a real
browser (overview -> latent -> structure -> paste a sequence -> permalink)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import duckdb
import httpx
import pytest

from plmscope import demo
from plmscope.cli import main
from tests.web.test_browser import SHOTS, _ready, non_background_fraction, serving

COMMITTED = demo.COMMITTED_SAE


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_committed_sae_matches_what_the_demo_command_makes(tmp_path):
    cfg = json.loads((COMMITTED / "cfg.json").read_text())
    meta = cfg["plmscope"]
    assert (meta["plm"], meta["layer"]) == (demo.DEMO_MODEL, demo.DEMO_LAYER)
    assert (cfg["architecture"], cfg["d_sae"], cfg["k"]) == (
        _flag(demo.SAE_TRAIN_ARGS, "--arch"), int(_flag(demo.SAE_TRAIN_ARGS, "--latents")), int(_flag(demo.SAE_TRAIN_ARGS, "--k"))
    )
    assert meta["training"]["seed"] == int(_flag(demo.SAE_TRAIN_ARGS, "--seed"))
    # the training proteins are exactly the ones the command derives from the committed corpus
    train, heldout = demo.write_sae_fastas(tmp_path)
    assert meta["corpus"]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert meta["corpus"]["n_proteins"] == demo.SAE_TRAIN_PROTEINS
    # the stored eval metrics were measured on the held-out proteins, not the training ones
    metrics = meta["metrics"]
    assert metrics["corpus"]["sha256"] == hashlib.sha256(heldout.read_bytes()).hexdigest()
    assert metrics["loss_recovered_pct"] > 90 and metrics["explained_variance"] > 0.7
    assert not (COMMITTED / "checkpoint").exists()


def test_demo_corpus_keeps_every_structure_and_flat_file_protein(tmp_path):
    corpus = demo.write_corpus(tmp_path / "corpus.tsv", 300)
    from plmscope.sequences import read_proteins

    proteins = read_proteins(corpus).proteins
    accs = {p.accession for p in proteins}
    with open(demo.DATA / "structures.tsv") as fh:
        structured = {line.split("\t")[0] for line in list(fh)[1:]}
    assert structured <= accs and len(proteins) == 300
    kinds = {a.kind for p in proteins for a in p.annotations}
    assert {"pfam", "feature", "nls"} <= kinds


@pytest.fixture(scope="module")
def demo_atlas(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--workdir", str(work), "--proteins", "260", "--no-serve"]) == 0
    return work / "atlas.duckdb"


def test_demo_atlas_holds_structures_and_analysis(demo_atlas):
    con = duckdb.connect(str(demo_atlas), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM proteins").fetchone()[0] == 260
        assert con.execute("SELECT count(DISTINCT accession) FROM structures").fetchone()[0] >= 90
        sae_id, plm, layer = con.execute("SELECT sae_id, plm, layer FROM saes").fetchone()
        assert (plm, layer) == (demo.DEMO_MODEL, demo.DEMO_LAYER)
        n_desc = con.execute("SELECT count(*) FROM latent_analysis WHERE description LIKE 'auto: %'").fetchone()[0]
        assert n_desc == con.execute("SELECT d_sae FROM saes").fetchone()[0]
    finally:
        con.close()


@pytest.mark.browser
def test_demo_in_a_real_browser(demo_atlas, tmp_path):
    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with serving(demo_atlas, tmp_path / "serve.log") as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        # overview -> a latent whose top example has a structure
        page.goto(base + "/")
        _ready(page)
        assert "unirep-256" in page.locator("h1").inner_text()
        # the SAE's quality numbers from eval-sae are shown, not left blank
        metrics = json.loads((COMMITTED / "cfg.json").read_text())["plmscope"]["metrics"]
        quality = page.locator("#sae-quality").inner_text()
        assert f"{metrics['loss_recovered_pct']:.2f}%" in quality and "32" in quality
        SHOTS.mkdir(parents=True, exist_ok=True)  # README's screenshots are copies of these
        page.screenshot(path=str(SHOTS / "demo_overview.png"))
        ov = httpx.get(base + "/.json", params={"per_page": 200}).json()
        target = None
        for row in ov["latents"]:
            j = httpx.get(f"{base}/latents/{ov['sae_id']}/{row['latent']}.json").json()
            if j["top_examples"] and j["top_examples"][0]["has_structure"]:
                target = (row["latent"], j)
                break
        assert target, "no demo latent has a top example with a structure"
        latent, j = target
        link = page.locator(f"#latent-table tbody tr[data-latent='{latent}'] a")
        if link.count():  # on the overview's first page: click through like a person
            link.first.click()
            page.wait_for_url(f"**/latents/**/{latent}?**")
        else:
            page.goto(f"{base}/latents/{ov['sae_id']}/{latent}")
        _ready(page)
        assert page.locator("h1").inner_text().startswith(f"Latent {latent}")
        page.wait_for_function("document.querySelector('#viewer canvas') !== null", timeout=20_000)
        page.wait_for_timeout(800)
        assert non_background_fraction(page.locator("#viewer canvas").screenshot()) > 0.02
        page.screenshot(path=str(SHOTS / "demo_latent.png"))
        # paste a sequence and get latents live
        seq = j["top_examples"][0]["sequence"][:300]
        page.goto(base + "/infer")
        _ready(page)
        page.fill("#sequence", seq)
        page.click("#run")
        page.wait_for_url("**/infer?**")
        _ready(page)
        first = page.locator("#live-latents tbody tr[data-latent]").first.get_attribute("data-latent")
        api = httpx.post(base + "/api/infer", json={"sequence": seq}).json()
        assert int(first) == api["top_latents"][0]["latent"]
        page.screenshot(path=str(SHOTS / "demo_infer.png"))
        # the copied permalink reopens the same view in a fresh context
        page.click("#copy-link")
        link = page.locator("#permalink").input_value()
        assert parse_qs(urlparse(link).query)["atlas"] == [httpx.get(base + "/health").json()["atlas_id"]]
        other = browser.new_context().new_page()
        other.goto(link)
        _ready(other)
        assert other.locator("#live-latents tbody tr[data-latent]").first.get_attribute("data-latent") == first
        browser.close()
