"""Nothing blocks the event loop: atlas reads and model calls run in worker threads.

The first test records, for every call into the app's AtlasReader and every model batch, whether
it ran on the thread of the running event loop, while every route (pages, twins, exports, live
inference, uploads) is requested; a handler that reads DuckDB on the loop fails it.  The second
slows the real atlas reads down and checks that /health still answers at once meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import inspect
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from plmscope.settings import Settings
from plmscope.store.reader import AtlasReader
from plmscope.web.app import create_app

SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMK"


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ThreadRecorder:
    """Wraps methods of one object in place; each call notes whether it ran on an event-loop thread."""

    def __init__(self):
        self.calls = 0
        self.on_loop: list[str] = []

    def wrap(self, obj, name: str, delay: float = 0.0) -> None:
        method = getattr(obj, name)

        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            self.calls += 1
            if _on_event_loop():
                self.on_loop.append(name)
            if delay:
                time.sleep(delay)  # a slow query on a large atlas
            return method(*args, **kwargs)

        setattr(obj, name, wrapper)


# answered from what the reader read when it opened the atlas: no DuckDB query, so the event loop
# may call them (the SAE dependencies do, for every page); test_in_memory_reads_run_no_query holds them to it
IN_MEMORY = ("saes", "sae", "has_rows")


def reader_methods() -> list[str]:
    # every way into DuckDB: the public reads and the cursor plumbing under them
    return [n for n, f in inspect.getmembers(AtlasReader, inspect.isfunction)
            if n not in ("__init__", "close", *IN_MEMORY)]


def _app(tiny_atlas, **kw):
    return create_app(Settings(atlas=tiny_atlas.path, device="cpu", rate_limit_per_minute=0, **kw))


def test_no_atlas_read_or_model_call_runs_on_the_event_loop(tiny_atlas):
    app = _app(tiny_atlas, cache_size=0)
    rec = ThreadRecorder()
    with TestClient(app, raise_server_exceptions=False) as c:
        for name in reader_methods():
            rec.wrap(app.state.reader, name)
        rec.wrap(app.state.infer, "_compute")  # the pLM forward and the SAE
        overview = c.get("/.json").json()
        sae, latent = overview["sae_id"], overview["latents"][0]["latent"]
        hits = c.get("/proteins.json", params={"per_page": 500}).json()["proteins"]
        acc = next(h["accession"] for h in hits if h["has_structure"] and h["length"] <= 1022)
        protein = c.get(f"/proteins/{acc}.json").json()
        unstored = next(i for i in range(128) if i not in {t["latent"] for t in protein["top_latents"]})
        structure = gzip.compress(protein["structures"][0]["content"].encode())
        requests = [
            ("GET", "/", {}), ("GET", "/.csv", {}), ("GET", "/random", {}),
            ("GET", f"/latents/{sae}/{latent}", {}), ("GET", f"/latents/{sae}/{latent}.json", {}),
            ("GET", f"/latents/{sae}/{latent}.csv", {}),
            ("GET", "/proteins", {"params": {"q": acc}}), ("GET", "/proteins.csv", {}),
            ("GET", f"/proteins/{acc}", {}), ("GET", f"/proteins/{acc}.csv", {}),
            ("GET", f"/proteins/{acc}.json", {"params": {"latent": unstored}}),  # computed live
            ("GET", "/infer", {}), ("GET", "/infer", {"params": {"seq": protein["sequence"], "latents": "1,2"}}),
            ("GET", "/infer.json", {"params": {"seq": SEQ}}), ("GET", "/infer.csv", {"params": {"seq": SEQ[:40]}}),
            ("POST", "/api/infer", {"json": {"sequence": SEQ[:60], "latents": [3]}}),
            ("POST", "/infer", {"data": {"sequence": protein["sequence"]},
                                "files": {"structure": ("model.pdb.gz", structure)}}),
            ("GET", "/analysis", {}), ("GET", "/analysis.json", {}), ("GET", "/health", {}),
            ("GET", "/latents/nosuch/1.json", {}), ("GET", "/proteins/NOPE", {}),
        ]
        for method, url, kw in requests:
            before = rec.calls
            r = c.request(method, url, follow_redirects=False, **kw)
            assert r.status_code < 500, (url, r.status_code, r.text[:300])
            # these need no query: nothing but the SAE rows (in memory) or no atlas data at all
            if not (url in ("/health", "/latents/nosuch/1.json", "/infer") and not kw):
                assert rec.calls > before, f"{method} {url} read nothing: the instrumentation missed it"
    assert not rec.on_loop, f"ran on the event loop: {sorted(set(rec.on_loop))}"


def test_the_recorder_sees_a_read_on_the_event_loop(tiny_atlas):
    # the check above can fail: the same wrapper, called from a coroutine, reports it
    reader = AtlasReader(tiny_atlas.path)
    rec = ThreadRecorder()
    rec.wrap(reader, "saes")

    async def handler_that_blocks():
        return reader.saes()

    try:
        asyncio.run(handler_that_blocks())
        reader.saes()  # from a plain thread: fine
    finally:
        reader.close()
    assert rec.on_loop == ["saes"] and rec.calls == 2


def test_in_memory_reads_run_no_query(tiny_atlas):
    reader = AtlasReader(tiny_atlas.path)
    try:
        rec = ThreadRecorder()
        rec.wrap(reader, "_cur")  # every query goes through the thread's cursor
        saes = reader.saes()
        first = reader.sae(saes[0]["sae_id"])
        filled = reader.has_rows("latents"), reader.has_rows("no_such_table")
        assert rec.calls == 0
        saes[0]["sae_id"] = "edited by a caller"  # callers get copies: the next call is unchanged
        assert reader.saes()[0]["sae_id"] == first["sae_id"] != "edited by a caller"
        assert filled == (True, False)
        rec.wrap(reader, "latent_list")
        reader.latent_list(first["sae_id"])
        assert rec.calls == 2  # the recorder sees a query (latent_list and its cursor)
    finally:
        reader.close()


@pytest.mark.parametrize("page_kind,slow", [("latent", "latent"), ("protein", "protein")])
def test_health_answers_while_a_slow_page_is_in_flight(tiny_atlas, page_kind, slow):
    """The latent page is a plain-def handler; the protein page an async one (it may wait for live
    inference) that reads the protein in the thread pool."""
    app = _app(tiny_atlas)
    delay = 1.5

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                overview = (await c.get("/.json")).json()
                acc = (await c.get("/proteins.json")).json()["proteins"][0]["accession"]
                url = {"latent": f"/latents/{overview['sae_id']}/{overview['latents'][0]['latent']}.json",
                       "protein": f"/proteins/{acc}.json"}[page_kind]
                ThreadRecorder().wrap(app.state.reader, slow, delay=delay)
                t0 = time.perf_counter()
                page = asyncio.create_task(c.get(url))
                await asyncio.sleep(0.2)  # the page's read is under way
                health = await c.get("/health")
                health_done = time.perf_counter() - t0
                assert not page.done()
                r = await page
                return health, health_done, r, time.perf_counter() - t0

    health, health_done, page, page_done = asyncio.run(scenario())
    assert health.status_code == 200 and page.status_code == 200
    assert page_done >= delay
    assert health_done < 0.2 + delay / 2, f"/health took {health_done:.2f} s behind a {delay} s atlas read"


def test_latent_briefs_read_the_sae_once_and_equal_its_rows(tiny_atlas):
    reader = AtlasReader(tiny_atlas.path)
    try:
        sid = reader.saes()[0]["sae_id"]
        rec = ThreadRecorder()
        rec.wrap(reader, "_cur")
        first = reader.latent_briefs(sid, [0, 3, 10**6])  # a latent the SAE lacks is left out
        n_first = rec.calls
        again = reader.latent_briefs(sid, [3, 0])
        assert n_first >= 1 and rec.calls == n_first  # the second live result runs no query
        assert sorted(first) == [0, 3] and again == {k: first[k] for k in (3, 0)}
        row = reader._one("SELECT max_act, frac_proteins, top_family FROM latents WHERE sae_id = ? AND latent = 3", [sid])
        assert {k: first[3][k] for k in row} == row
        first[3]["max_act"] = -1.0  # callers get copies
        assert reader.latent_briefs(sid, [3])[3]["max_act"] == row["max_act"]
    finally:
        reader.close()
