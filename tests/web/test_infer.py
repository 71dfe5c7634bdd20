"""Live inference: /api/infer, the /infer page (permalinks, FASTA, uploads) and every limit."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from plmscope.settings import Settings
from plmscope.web.app import create_app

SEQ = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAEGLAAAIEKQGWPVLYD"


def _app(tiny_atlas, **kw):
    return create_app(Settings(atlas=tiny_atlas.path, device="cpu", **kw))


def test_api_infer(client):
    r = client.post("/api/infer", json={"sequence": SEQ, "latents": [0, 5], "top_k": 10})
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["length"] == len(SEQ) and j["sequence"] == SEQ and len(j["sequence_sha256"]) == 64
    assert 0 < len(j["top_latents"]) <= 10
    maxes = [t["max_act"] for t in j["top_latents"]]
    assert maxes == sorted(maxes, reverse=True)
    t = j["top_latents"][0]
    assert 1 <= t["max_pos"] <= len(SEQ) and t["n_active"] >= 1
    assert [h["latent"] for h in j["heatmaps"]] == [0, 5]
    assert all(len(h["activations"]) == len(SEQ) for h in j["heatmaps"])
    again = client.post("/api/infer", json={"sequence": SEQ, "latents": [0, 5], "top_k": 10}).json()
    assert again["cached"] and again["top_latents"] == j["top_latents"]


def test_fasta_first_record_used(client):
    fasta = f">first protein\n{SEQ[:60]}\n{SEQ[60:120]}\n>second\nMKV\n>third\nMAA\n"
    j = client.post("/api/infer", json={"sequence": fasta}).json()
    assert j["record"] == "first protein" and j["sequence"] == SEQ[:120]
    assert j["ignored_records"] == ["second", "third"]


def test_corpus_match_gives_structure(client):
    hits = client.get("/proteins.json", params={"per_page": 500}).json()["proteins"]
    acc = next(h["accession"] for h in hits if h["has_structure"] and h["length"] <= 1022)
    seq = client.get(f"/proteins/{acc}.json").json()["sequence"]
    j = client.get("/infer.json", params={"seq": seq}).json()
    assert j["matched_accession"] == acc
    html = client.get("/infer", params={"seq": seq, "latents": "1,2"}).text
    assert 'id="structures-data"' in html and "ATOM" in html and 'id="live-heatmaps"' in html


def test_infer_page_permalink(client, tiny_atlas):
    r = client.post("/infer", data={"sequence": SEQ[:50], "latents": "3, 4"}, follow_redirects=False)
    assert r.status_code == 303
    loc = r.headers["location"]
    assert loc.startswith("/infer?") and "seq=" + SEQ[:50] in loc and "latents=3%2C+4" in loc and "atlas=" in loc
    page = client.get(loc).text
    assert 'id="live-latents"' in page and "latent #3" in page and "latent #4" in page
    assert client.get("/infer").status_code == 200  # empty form
    csv_text = client.get("/infer.csv", params={"seq": SEQ[:50]}).text
    assert csv_text.startswith("latent,max_act")


@pytest.mark.parametrize("body,status,fragment", [
    ({"sequence": "MKV1LLA"}, 422, "position 4"),
    ({"sequence": ""}, 422, "no sequence"),
    ({"sequence": "MKVLLA", "latents": [100000]}, 404, "no latent 100000"),  # as on the protein and latent pages
    ({"sequence": "MKVLLA", "latents": [-1]}, 422, "latents"),
    ({"sequence": ">x\nMKV\n\n>y\nAAA", "latents": [1] * 33}, 422, "latents"),
    ({"sequence": "MKVLLA", "sae_id": "other"}, 404, "no SAE"),
    ({"sequence": "MKVLLA", "top_k": 0}, 422, "top_k"),
    ({"nothing": 1}, 422, "sequence"),
])
def test_bad_input_is_4xx_with_message(client, body, status, fragment):
    r = client.post("/api/infer", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_too_long_sequence(tiny_atlas):
    # an input error like any other (422); 413 is for request bodies over max_request_bytes
    with TestClient(_app(tiny_atlas, max_residues=50)) as c:
        r = c.post("/api/infer", json={"sequence": SEQ[:51]})
        assert r.status_code == 422 and "has 51 residues" in r.json()["detail"] and "at most 50" in r.json()["detail"]
        page = c.get("/infer", params={"seq": SEQ[:51]})
        assert page.status_code == 422 and "at most 50" in page.text
        fasta = ">long one\n" + "\n".join(SEQ[i:i + 20] for i in range(0, 60, 20)) + "\n>ignored\n" + SEQ
        assert c.post("/api/infer", json={"sequence": fasta}).status_code == 422  # 60 residues in the first record
        assert c.post("/api/infer", json={"sequence": SEQ[:50]}).status_code == 200
        assert c.post("/api/infer", json={"sequence": f">ok\n{SEQ[:25]}\n {SEQ[25:50]}*\n>ignored\n{SEQ}"}).status_code == 200
        schema = c.get("/openapi.json").json()["components"]["schemas"]["InferRequest"]["properties"]["sequence"]
        assert "{1,50}" in schema["pattern"]  # the limit the schema publishes is the one enforced


def test_request_body_limit(tiny_atlas):
    with TestClient(_app(tiny_atlas, max_request_bytes=2048)) as c:
        r = c.post("/api/infer", content=json.dumps({"sequence": "A" * 5000}), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "2,048 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams
            yield b'{"sequence": "'
            for _ in range(10):
                yield b"A" * 1000
            yield b'"}'

        r = c.post("/api/infer", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_rate_limit(tiny_atlas):
    with TestClient(_app(tiny_atlas, rate_limit_per_minute=2)) as c:
        assert c.post("/api/infer", json={"sequence": "MKVLLA"}).status_code == 200
        assert c.post("/api/infer", json={"sequence": "MKVLLAG"}).status_code == 200
        r = c.post("/api/infer", json={"sequence": "MKVLLAGG"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "too many" in r.json()["detail"]
        assert c.get("/.json").status_code == 200  # pages are not rate limited


def test_queue_full_gives_503_with_retry_after(tiny_atlas):
    app = _app(tiny_atlas, infer_queue_size=1, infer_batch_size=1, cache_size=0, rate_limit_per_minute=0)

    async def burst():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                seqs = [SEQ[i:] + SEQ[:i] for i in range(12)]  # distinct: no cache, no sharing
                return await asyncio.gather(*[c.post("/api/infer", json={"sequence": s}) for s in seqs])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 200 in codes and 503 in codes, codes
    full = next(r for r in responses if r.status_code == 503)
    assert int(full.headers["retry-after"]) >= 1 and "queue is full" in full.json()["detail"]


def test_micro_batching_groups_concurrent_requests(tiny_atlas):
    app = _app(tiny_atlas, infer_batch_size=8, infer_max_wait_ms=200, cache_size=0, rate_limit_per_minute=0)

    async def burst():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                rs = await asyncio.gather(*[c.post("/api/infer", json={"sequence": SEQ[i:i + 80]}) for i in range(8)])
                return rs, app.state.infer.batches_run

    responses, batches = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert batches < 8  # several requests shared a pLM forward
    # batching does not change results: each equals a request run alone
    with TestClient(_app(tiny_atlas, infer_batch_size=1)) as c:
        alone = c.post("/api/infer", json={"sequence": SEQ[0:80]}).json()
    assert alone["top_latents"] == responses[0].json()["top_latents"]


def test_structure_upload(client, tiny_atlas):
    hits = client.get("/proteins.json", params={"per_page": 500}).json()["proteins"]
    acc = next(h["accession"] for h in hits if h["has_structure"] and h["length"] <= 1022)
    p = client.get(f"/proteins/{acc}.json").json()
    s = p["structures"][0]
    data = gzip.compress(s["content"].encode())
    r = client.post("/infer", data={"sequence": p["sequence"]}, files={"structure": ("model.pdb.gz", data)})
    assert r.status_code == 200, r.text
    assert 'id="structures-data"' in r.text and "upload-error" not in r.text and "ATOM" in r.text
    bad = client.post("/infer", data={"sequence": p["sequence"]}, files={"structure": ("x.pdb", b"this is not a structure")})
    assert bad.status_code == 200 and 'id="upload-error"' in bad.text
    other = client.post("/infer", data={"sequence": "WWWWWWWWWWWWWWWWWWWW"}, files={"structure": ("m.pdb", s["content"].encode())})
    assert "no protein chain" in other.text or 'id="upload-error"' in other.text


def test_upload_size_cap(tiny_atlas):
    with TestClient(_app(tiny_atlas, max_upload_bytes=1024, max_request_bytes=1024)) as c:
        r = c.post("/infer", data={"sequence": "MKVLLA"}, files={"structure": ("big.pdb", b"A" * 1500)})
        assert r.status_code == 200 and "the limit is 1,024" in r.text
        r = c.post("/infer", data={"sequence": "MKVLLA"}, files={"structure": ("huge.pdb", b"A" * 5000)})
        assert r.status_code == 413


def test_without_model_pages_work_and_infer_says_why(tiny_atlas):
    with TestClient(_app(tiny_atlas, load_model=False)) as c:
        assert c.get("/").status_code == 200
        h = c.get("/health").json()
        assert h["status"] == "degraded" and not h["model_loaded"] and "switched off" in h["model_error"]
        r = c.post("/api/infer", json={"sequence": "MKVLLA"})
        assert r.status_code == 503 and "not available" in r.json()["detail"]
        page = c.get("/infer", params={"seq": "MKVLLA"})
        assert page.status_code == 503 and 'id="model-unavailable"' in page.text and "MKVLLA" in page.text


def test_server_error_has_no_traceback(tiny_atlas, caplog):
    app = _app(tiny_atlas, load_model=False)

    def broken():
        raise RuntimeError("secret internal detail")

    app.add_api_route("/broken", broken)  # a real failing endpoint through the real error handling
    with TestClient(app, raise_server_exceptions=False) as c:
        for headers in ({}, {"accept": "application/json"}):
            r = c.get("/broken", headers=headers)
            assert r.status_code == 500
            assert "Traceback" not in r.text and "secret internal detail" not in r.text
            assert "reference" in r.text
    assert any("secret internal detail" in rec.getMessage() or rec.exc_info for rec in caplog.records)


def test_cors_only_when_configured(tiny_atlas):
    with TestClient(_app(tiny_atlas, load_model=False, cors_origins=["https://lab.example"])) as c:
        r = c.get("/.json", headers={"Origin": "https://lab.example"})
        assert r.headers.get("access-control-allow-origin") == "https://lab.example"


def test_unirep_residue_one_is_greyed_and_never_the_maximum(tmp_path):
    """A UniRep atlas: heatmaps (stored and live) say residue 1 is context-free; it is never a maximum,
    although the SAE's live activations there are kept in the JSON."""
    from plmscope.cli import main
    from tests.conftest import demo_rows, make_sae

    rows = [r for r in demo_rows() if len(r["sequence"]) < 150][:8]
    corpus = tmp_path / "c.fasta"
    corpus.write_text("".join(f">{r['accession']}\n{r['sequence']}\n" for r in rows))
    sae = make_sae(tmp_path / "sae", "unirep-64", layer=1, d_in=64, d_sae=48, k=4, seed=3)
    atlas = tmp_path / "u.duckdb"
    assert main(["build", "--corpus", str(corpus), "--sae", str(sae), "--out", str(atlas), "--device", "cpu"]) == 0
    with TestClient(create_app(Settings(atlas=atlas, device="cpu", rate_limit_per_minute=0))) as c:
        j = c.post("/api/infer", json={"sequence": rows[0]["sequence"], "top_k": 48}).json()
        assert all(t["max_pos"] != 1 for t in j["top_latents"])
        # a latent that fires on residue 1 of this protein: its value is shown, its maximum lies elsewhere
        first = [h for lats in (range(i, i + 8) for i in range(0, 48, 8))
                 for h in c.post("/api/infer", json={"sequence": rows[0]["sequence"], "latents": list(lats)}).json()["heatmaps"]
                 if h["activations"] and h["activations"][0] > 0]
        assert first, "no latent of this SAE fires on residue 1: the test cannot check anything"
        for h in first:
            assert h["context_free"] == 1 and h["max_pos"] != 1
        page = c.get(f"/proteins/{rows[0]['accession']}.json").json()
        assert page["heatmap"] is None or page["heatmap"]["context_free"] == 1
        assert 'data-cf="1"' in c.get("/infer", params={"seq": rows[0]["sequence"], "latents": "0,1"}).text


def test_inference_worker_has_its_own_threads_and_lower_priority(tiny_atlas):
    import os

    import torch

    before = torch.get_num_threads()
    try:
        with TestClient(_app(tiny_atlas, infer_threads=1, infer_nice=5)) as c:
            service = c.app.state.infer
            assert service.worker_threads == 1
            assert service.worker_nice == os.getpriority(os.PRIO_PROCESS, 0) + 5  # the worker only, not the process
            assert c.post("/api/infer", json={"sequence": SEQ[:40]}).status_code == 200
            # what the worker thread itself reports while it runs
            seen = asyncio.run(_on_worker(service, lambda: (torch.get_num_threads(),
                                                           os.getpriority(os.PRIO_PROCESS, __import__("threading").get_native_id()))))
            assert seen == (1, service.worker_nice)
    finally:
        torch.set_num_threads(before)


async def _on_worker(service, fn):
    return await service.run_job(fn)


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_sparse_activations_are_the_non_zeros_of_encode(architecture):
    import numpy as np
    import torch

    from plmscope.sae.model import SparseAutoencoder, make_cfg
    from plmscope.web.inference import sparse_activations

    cfg = make_cfg(plm="esm2_t6_8M_UR50D", layer=3, d_in=16, d_sae=64, architecture=architecture,
                   k=5 if architecture == "topk" else None)
    sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = sae.encode(x)
        pos, lat, val = sparse_activations(sae, x)
    dense = np.zeros(tuple(z.shape), dtype=np.float32)
    dense[pos, lat] = val
    assert np.array_equal(dense, z.numpy()) and (val > 0).all()
    assert len(set(zip(pos.tolist(), lat.tolist()))) == len(pos) == int((z > 0).sum())


def _timing(header: str) -> dict[str, str]:
    return {part.split(";")[0].strip(): part.strip() for part in header.split(",")}


def test_server_timing_splits_a_live_request(tiny_atlas):
    """The header bench_server.py splits /api/infer's overhead with: queue + model <= infer, the
    batch size named, a cached result with infer only, on the JSON API and the page's JSON twin."""
    with TestClient(_app(tiny_atlas, rate_limit_per_minute=0)) as c:
        r = c.post("/api/infer", json={"sequence": SEQ[:60]})
        parts = _timing(r.headers["server-timing"])
        assert set(parts) == {"queue", "model", "infer"} and 'desc="batch of 1"' in parts["model"]
        dur = {k: float(v.split("dur=")[1].split(";")[0]) for k, v in parts.items()}
        assert 0 <= dur["queue"] and 0 < dur["model"] <= dur["infer"] and dur["queue"] + dur["model"] <= dur["infer"]
        again = c.post("/api/infer", json={"sequence": SEQ[:60]})
        assert again.json()["cached"] and set(_timing(again.headers["server-timing"])) == {"infer"}
        twin = c.get("/infer.json", params={"seq": SEQ[:50]})
        assert set(_timing(twin.headers["server-timing"])) == {"queue", "model", "infer"}
        assert "server-timing" not in c.get("/health").headers  # only live results carry it
        doc = c.get("/openapi.json").json()["paths"]
        for path, method in (("/api/infer", "post"), ("/infer.json", "get")):
            assert "Server-Timing" in doc[path][method]["responses"]["200"]["headers"]


def test_worker_threads_default_to_one_on_a_gpu():
    import torch

    from plmscope.web.inference import worker_thread_count

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert worker_thread_count(0, [cuda, cuda], default=16) == 1
    assert worker_thread_count(0, [cuda, cpu], default=16) == 16  # a CPU model computes on these threads
    assert worker_thread_count(0, [cpu], default=2) == 2
    assert worker_thread_count(0, [], default=2) == 2
    assert worker_thread_count(4, [cuda], default=16) == 4  # an explicit setting wins


def test_live_result_summaries_equal_a_per_latent_loop():
    """Per latent: strongest value, the first residue reaching it (ties), residues active; the
    context-free residues left out of the summaries but not out of the vectors."""
    import numpy as np

    from plmscope.web.inference import LiveResult

    rng = np.random.default_rng(0)
    n, k = 120, 16
    pos = np.repeat(np.arange(n), k).astype(np.int32)
    lat = rng.integers(0, 300, n * k).astype(np.int32)
    val = np.round(rng.random(n * k), 1).astype(np.float32)  # many ties
    r = LiveResult("s", n, pos, lat, val, context_free=1)
    expect = {}
    for p, l, v in zip(pos.tolist(), lat.tolist(), val.tolist()):
        if p < 1:
            continue
        best, at, count = expect.get(l, (-1.0, -1, 0))
        expect[l] = (v, p, count + 1) if v > best else (best, at, count + 1)
    assert r.summary_latents.tolist() == sorted(expect)
    assert [(float(m), int(a), int(c)) for m, a, c in zip(r.summary_max, r.summary_argmax, r.summary_count)] == \
        [expect[l] for l in sorted(expect)]
    assert r.vector(int(lat[0]))[0] == round(float(val[0]), 4)  # residue 1 keeps its value in the vector
    empty = LiveResult("s", 3, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    assert empty.top(5) == [] and empty.summary_latents.size == 0


def test_two_workers_compute_side_by_side_with_the_threads_shared_out(tiny_atlas):
    """Two jobs meet at a barrier only if they run at once; the first started gets both torch
    threads, the second one (a lone job afterwards gets both again); a burst of requests on two
    workers gives each the result it gets alone."""
    import threading

    import torch

    app = _app(tiny_atlas, infer_workers=2, infer_threads=2, infer_batch_size=2, cache_size=0, rate_limit_per_minute=0)
    barrier = threading.Barrier(2, timeout=30)

    def meet():
        barrier.wait()
        return torch.get_num_threads()

    async def run():
        async with app.router.lifespan_context(app):
            service = app.state.infer
            together = await asyncio.gather(service.run_job(meet), service.run_job(meet))
            alone = await service.run_job(torch.get_num_threads)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                burst = await asyncio.gather(*[c.post("/api/infer", json={"sequence": SEQ[i:i + 70]}) for i in range(0, 80, 10)])
                health = (await c.get("/health")).json()
            return together, alone, burst, health

    together, alone, burst, health = asyncio.run(run())
    assert together == [2, 1] and alone == 2
    assert (health["infer_workers"], health["infer_threads"]) == (2, 2)
    with TestClient(_app(tiny_atlas, infer_workers=1, infer_batch_size=1, cache_size=0, rate_limit_per_minute=0)) as c:
        for i, r in zip(range(0, 80, 10), burst):
            assert r.status_code == 200
            assert r.json()["top_latents"] == c.post("/api/infer", json={"sequence": SEQ[i:i + 70]}).json()["top_latents"]


def test_worker_count_defaults():
    import torch

    from plmscope.web.inference import worker_count

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert worker_count(0, [cpu], cpus=2) == 2 and worker_count(0, [cpu], cpus=16) == 2
    assert worker_count(0, [cpu], cpus=1) == 1
    assert worker_count(0, [cuda], cpus=16) == 1
    assert worker_count(3, [cuda], cpus=1) == 3  # an explicit setting wins
