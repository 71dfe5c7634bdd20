"""Real browser tests: headless Debian Chromium (Playwright) against `plmscope serve` on loopback.

Screenshots go to tests/_artifacts/screenshots/ (git-ignored) for people to look at.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
SHOTS = Path(__file__).resolve().parents[1] / "_artifacts" / "screenshots"
ZOOM = 9  # heatmap cell width in CSS px, fixed through the URL so positions are computable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(atlas: Path, log: Path):
    """`plmscope serve` on a free loopback port, yielded as its base URL once the models are loaded."""
    port = _free_port()
    env = dict(os.environ, PLMSCOPE_RATE_LIMIT_PER_MINUTE="0")
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plmscope.cli", "serve", "--atlas", str(atlas), "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu"],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded wait for the lifespan (models load) to finish
            if proc.poll() is not None:
                pytest.fail(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).json().get("model_loaded"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server did not become ready: {log.read_text()[-2000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tiny_atlas, tmp_path_factory):
    with serving(tiny_atlas.path, tmp_path_factory.mktemp("server") / "server.log") as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


def _ready(pg):
    pg.wait_for_selector("body[data-ready='1']", timeout=20_000)


def _latent_with_structure(base: str) -> tuple[str, int, dict]:
    ov = httpx.get(base + "/.json", params={"per_page": 200}).json()
    for row in ov["latents"]:
        j = httpx.get(f"{base}/latents/{ov['sae_id']}/{row['latent']}.json").json()
        if j["top_examples"] and j["top_examples"][0]["has_structure"]:
            return ov["sae_id"], row["latent"], j
    for row in ov["latents"]:
        j = httpx.get(f"{base}/latents/{ov['sae_id']}/{row['latent']}.json").json()
        if any(e["has_structure"] for e in j["top_examples"]):
            return ov["sae_id"], row["latent"], j
    pytest.fail("no latent of the tiny atlas has an example with a structure")


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, raw unfiltered rows) of an 8-bit RGB/RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return width, height, bpp, bytes(out)


def non_background_fraction(png: bytes) -> float:
    w, h, bpp, px = decode_png(png)
    bg = px[:3]
    n = sum(1 for i in range(0, len(px), bpp) if abs(px[i] - bg[0]) + abs(px[i + 1] - bg[1]) + abs(px[i + 2] - bg[2]) > 30)
    return n / (w * h)


def test_overview_to_latent(page, server):
    page.goto(server + "/")
    _ready(page)
    rows = page.locator("#latent-table tbody tr[data-latent]")
    assert rows.count() > 10
    page.screenshot(path=str(SHOTS / "overview.png"), full_page=False)
    first = rows.first.get_attribute("data-latent")
    rows.first.locator("a").first.click()
    page.wait_for_url(f"**/latents/**/{first}?**")
    _ready(page)
    assert page.locator("h1").inner_text().startswith(f"Latent {first}")
    assert page.locator("#histogram svg rect.bar").count() >= 1


def test_latent_heatmap_values_and_structure(page, server):
    sae_id, latent, j = _latent_with_structure(server)
    ex = j["top_examples"][0]
    page.goto(f"{server}/latents/{sae_id}/{latent}?zoom={ZOOM}")
    _ready(page)
    row = page.locator("#top-examples .hm-row").first
    assert row.get_attribute("data-acc") == ex["accession"]
    canvas = row.locator("canvas.hm")
    pos = ex["max_pos"]
    # bring the strongest residue into view, then hover it with the real mouse
    page.evaluate(f"document.getElementById('top-examples').scrollLeft = {max(0, (pos - 20) * ZOOM)}")
    box = canvas.bounding_box()
    x, y = box["x"] + (pos - 0.5) * ZOOM, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    tip = page.locator("#hm-tip")
    assert tip.is_visible()
    text = tip.inner_text()
    aa = ex["sequence"][pos - 1]
    assert text.startswith(f"{aa}{pos} ·"), text
    shown = float(text.split("·")[1])
    assert abs(shown - ex["activations"][pos - 1]) <= 1e-3 * max(1.0, abs(shown)), (text, ex["activations"][pos - 1])
    # the cell's colour is the colour scale at value / latent max (mouse moved away: no hover outline)
    page.mouse.move(0, 0)
    colour = page.evaluate(
        """([sel, pos, cw, t]) => {
            const c = document.querySelector(sel);
            const d = c.getContext('2d').getImageData((pos - 1) * cw + 1, 1, 1, 1).data;
            return [[d[0], d[1], d[2]], window.plmscopeColour(t)];
        }""",
        ["#top-examples .hm-row canvas.hm", pos, ZOOM, ex["activations"][pos - 1] / j["stats"]["max_act"]],
    )
    got, want = colour
    want_rgb = [int(v) for v in want[4:-1].split(",")] if want.startswith("rgb") else None
    assert want_rgb and max(abs(a - b) for a, b in zip(got, want_rgb)) <= 2, colour
    # a zero-activation residue reads 0
    zero = next((i + 1 for i, v in enumerate(ex["activations"]) if v == 0), None)
    if zero:
        page.evaluate(f"document.getElementById('top-examples').scrollLeft = {max(0, (zero - 20) * ZOOM)}")
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + (zero - 0.5) * ZOOM, y)
        assert page.locator("#hm-tip").inner_text() == f"{ex['sequence'][zero - 1]}{zero} · 0"
    # the 3D structure draws
    viewer = page.locator("#viewer")
    page.wait_for_function("document.querySelector('#viewer canvas') !== null", timeout=20_000)
    page.wait_for_timeout(800)
    assert viewer.get_attribute("data-shown") == ex["accession"]
    frac = non_background_fraction(page.locator("#viewer canvas").screenshot())
    assert frac > 0.02, f"3D canvas nearly blank ({frac:.3%} non-background pixels)"
    assert page.locator("#legend-max").inner_text() != ""
    page.screenshot(path=str(SHOTS / "latent.png"), full_page=False)
    page.screenshot(path=str(SHOTS / "latent_full.png"), full_page=True)


def test_permalink_round_trip(page, server, browser):
    sae_id, latent, j = _latent_with_structure(server)
    ex = j["top_examples"][0]
    page.goto(f"{server}/latents/{sae_id}/{latent}?zoom={ZOOM}")
    _ready(page)
    page.check("#align")
    # click the strongest residue of the first example (aligned view: its offset is anchor - max_pos)
    anchor = max(e["max_pos"] for e in j["top_examples"])
    group = "document.getElementById('top-examples')"
    page.evaluate(f"{group}.scrollLeft = {max(0, (anchor - 20) * ZOOM)}")
    box = page.locator("#top-examples .hm-row canvas.hm").first.bounding_box()
    page.mouse.click(box["x"] + (anchor - 0.5) * ZOOM, box["y"] + box["height"] / 2)
    selection = page.locator("#selection").inner_text()
    assert selection.startswith(f"selected: {ex['accession']} {ex['sequence'][ex['max_pos'] - 1]}{ex['max_pos']}")
    page.click("#copy-link")
    link = page.locator("#permalink").input_value()
    q = parse_qs(urlparse(link).query)
    atlas_id = httpx.get(server + "/health").json()["atlas_id"]
    assert q["atlas"] == [atlas_id] and q["align"] == ["1"] and q["res"] == [f"{ex['accession']}:{ex['max_pos']}"]
    assert q["zoom"] == [str(ZOOM)]
    # a fresh browser context (no shared state) opening the link sees the same view
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    other = ctx.new_page()
    other.goto(link)
    _ready(other)
    assert other.locator("#align").is_checked()
    assert other.locator("#selection").inner_text() == selection
    assert other.locator("#viewer").get_attribute("data-shown") == ex["accession"]
    other.screenshot(path=str(SHOTS / "permalink_reopened.png"))
    ctx.close()
    # a link from another atlas build is refused with an explanation
    stale = page.goto(link.replace(atlas_id, "0000000000000000"))
    assert stale.status == 409 and "another atlas" in page.locator("h1").inner_text().lower()
    page.screenshot(path=str(SHOTS / "stale_link_409.png"))


def test_paste_sequence_and_get_latents(page, server):
    hits = httpx.get(server + "/proteins.json", params={"per_page": 500}).json()["proteins"]
    acc = next(h["accession"] for h in hits if h["has_structure"] and h["length"] <= 1022)
    seq = httpx.get(f"{server}/proteins/{acc}.json").json()["sequence"]
    page.goto(server + "/infer")
    _ready(page)
    page.fill("#sequence", f">pasted {acc}\n{seq[:80]}\n{seq[80:]}\n")
    page.click("#run")
    page.wait_for_url("**/infer?**")
    _ready(page)
    rows = page.locator("#live-latents tbody tr[data-latent]")
    assert rows.count() > 0
    api = httpx.post(server + "/api/infer", json={"sequence": seq}).json()
    assert int(rows.first.get_attribute("data-latent")) == api["top_latents"][0]["latent"]
    assert page.locator("#live-heatmaps .hm-row").count() == 3
    assert "seq=" in page.url and "atlas=" in page.url  # the page is a permalink
    page.wait_for_function("document.querySelector('#viewer canvas') !== null", timeout=20_000)
    page.wait_for_timeout(800)
    assert non_background_fraction(page.locator("#viewer canvas").screenshot()) > 0.02
    page.screenshot(path=str(SHOTS / "infer.png"), full_page=False)
    # reload of the permalink gives the same latents
    url = page.url
    page.goto(url)
    _ready(page)
    assert int(page.locator("#live-latents tbody tr[data-latent]").first.get_attribute("data-latent")) == api["top_latents"][0]["latent"]


def test_protein_page_and_phone_layout(browser, server):
    hits = httpx.get(server + "/proteins.json", params={"per_page": 500}).json()["proteins"]
    acc = next(h["accession"] for h in hits if h["has_structure"] and h["length"] <= 1022)
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    pg.goto(f"{server}/proteins/{acc}")
    _ready(pg)
    assert pg.locator("#protein-heatmap .hm-row").count() == 1
    assert pg.locator("canvas.track").count() >= 1
    pg.screenshot(path=str(SHOTS / "protein.png"), full_page=False)
    ctx.close()
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                has_touch=True)
    pg = phone.new_page()
    ov = httpx.get(server + "/.json").json()
    pg.goto(f"{server}/latents/{ov['sae_id']}/{ov['latents'][0]['latent']}")
    _ready(pg)
    # nothing but the heatmap groups (which scroll inside themselves) is wider than the screen
    overflow = pg.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 1, f"page is {overflow}px wider than a phone screen"
    pg.screenshot(path=str(SHOTS / "phone_latent.png"), full_page=False)
    pg.goto(server + "/")
    _ready(pg)
    pg.screenshot(path=str(SHOTS / "phone_overview.png"), full_page=False)
    phone.close()


def test_thousand_residue_heatmap_stays_responsive(page, server):
    """A ~1000-residue sequence: 3 heatmap rows draw and hovering answers (no timing assert, just works)."""
    seq = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRL" * 10)[:1000]
    page.goto(f"{server}/infer?seq={seq}&zoom={ZOOM}")
    _ready(page)
    rows = page.locator("#live-heatmaps .hm-row canvas.hm")
    assert rows.count() == 3
    assert rows.first.evaluate("c => c.width") >= 1000 * ZOOM
    box = rows.first.bounding_box()
    page.mouse.move(box["x"] + 4.5 * ZOOM, box["y"] + 5)
    assert page.locator("#hm-tip").inner_text().startswith(f"{seq[4]}5 ·")
