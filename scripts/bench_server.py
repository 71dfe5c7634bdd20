#!/usr/bin/env python
"""Benchmark the web server (`plmscope serve`) on loopback: page JSON latency, inference overhead, batching.

Setup (all local, no downloads): ESM-2 8M architecture with random weights, a TopK SAE with 4096
latents (random init), demo proteins, built into an atlas with the real ``plmscope build`` -- or
``--atlas`` to reuse one (e.g. the build benchmark's).  The server runs as a real ``plmscope serve``
subprocess on 127.0.0.1; clients are httpx in this process.

1. p50/p99 of ``/latents/{sae}/{n}.json`` and ``/proteins/{acc}.json`` (random live latents/proteins).
2. ``POST /api/infer`` on a 300-residue sequence (cache off) vs a bare forward in a fresh process (the
   same pLM layer + SAE encode, no server, run while no server runs, before and after the server):
   overhead ratio = server p50 / mean of the two bare p50s, split by the server's Server-Timing header
   (its own compute vs the rest); ``--infer-variants`` measures further servers' settings alike.
3. Requests/s with 16 concurrent clients: the server as configured (micro-batches of ``--batch-size``
   on its default ``infer_workers``), micro-batching on one worker, and one request at a time on one
   worker (the baseline of both speedups); all three servers up, ``--rounds`` rounds alternated.
4. p50/p99 of ``/latents/{sae}/{n}.json`` fetched one after another *while* the 16 clients run
   inference, with the inference worker at a lower CPU priority (``infer_nice`` 10, the default) and
   at the pages' priority (``infer_nice`` 0, as before issue 17), side by side in one run.

Goals (issue 17): overhead <= 1.1x, batching >= 1.3x, latent JSON p99 <= 50 ms under inference load
and p50 <= 10 ms unloaded on a quiet machine; ``goals`` in the output says which were met.  Batching
can gain no more than the forward itself gains from batches: ``bare_forward.ceiling`` measures that
(one at a time vs batches of ``--batch-size``, GFLOP/s both ways) and ``goals.batching_ceiling`` says
whether 1.3x is within its reach.

    python scripts/bench_server.py                          # builds a 300-protein, 4096-latent atlas
    python scripts/bench_server.py --atlas bench.duckdb --queries 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import matmul_gflops
from plmscope.vocab import AMINO_ACIDS as AA

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


def create_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atlas", help="existing atlas to serve (default: build one in --workdir)")
    p.add_argument("--workdir", help="inputs and built atlas (default: a temp dir)")
    p.add_argument("--proteins", type=int, default=300, help="proteins in the built atlas")
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layer", type=int, default=None, help="SAE layer (default: the last one)")
    p.add_argument("--arch", default="esm2_t6_8M_UR50D", help="ESM-2 architecture (random weights)")
    p.add_argument("--device", default="cpu", help="where the build, the server and the bare forward run")
    p.add_argument("--queries", type=int, default=300, help="requests per page kind")
    p.add_argument("--infer-runs", type=int, default=30, help="single /api/infer calls (and bare forwards)")
    p.add_argument("--length", type=int, default=300, help="residues of the inference sequence")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients for the throughput test")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of batched and one-at-a-time throughput")
    p.add_argument("--per-client", type=int, default=6, help="requests per client in the throughput test")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size of the batched server")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--infer-variants", nargs="*", default=[], metavar="NAME=VALUE,...",
                   help="further servers whose /api/infer latency to measure, each a comma list of settings "
                        "(e.g. infer_nice=0 infer_threads=1,infer_nice=0)")
    p.add_argument("--child-bare", help=argparse.SUPPRESS)  # JSON file of sequences: bare forwards, in a fresh process
    return p


def build_atlas(work: Path, args) -> Path:
    import torch

    from plmscope.cli import main
    from plmscope.plm.esm2 import ARCHS, save_random_esm2
    from plmscope.sae.io import save_sae
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    out = work / f"bench_server_{args.arch}_{args.proteins}_{args.latents}.duckdb"
    if out.exists():
        return out
    plm = work / f"{args.arch}_random.pt"
    if not plm.exists():
        save_random_esm2(plm, args.arch, seed=0)
    d_in = ARCHS[args.arch][1]
    sae_dir = work / f"sae_{args.arch}_{args.latents}"
    if not (sae_dir / "cfg.json").exists():
        cfg = make_cfg(plm=str(plm), layer=args.layer, d_in=d_in, d_sae=args.latents, architecture="topk", k=args.k)
        save_sae(SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0)), sae_dir)
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if int(r["length"]) <= 1022]
    rows = random.Random(args.seed).sample(rows, min(args.proteins, len(rows)))
    corpus = work / f"corpus{args.proteins}.tsv"
    with open(corpus, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the results' JSON alone
        rc = main(["build", "--corpus", str(corpus), "--sae", str(sae_dir), "--out", str(out), "--device", args.device])
    if rc != 0:
        raise SystemExit(f"plmscope build failed with status {rc}")
    print(f"built {out.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


class Server:
    """`plmscope serve` as a subprocess with settings passed as PLMSCOPE_* variables."""

    def __init__(self, atlas: Path, device: str = "cpu", **settings):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, **{f"PLMSCOPE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "plmscope.cli", "serve", "--atlas", str(atlas), "--host",
                                      "127.0.0.1", "--port", str(self.port), "--device", device],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        for _ in range(900):  # at most ~3 minutes for the models to load
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit("server exited:\n" + self.log.read().decode()[-3000:])
            try:
                if httpx.get(self.base + "/health", timeout=2).json().get("model_loaded"):
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise SystemExit("server did not become ready")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2)}


def variants(base: str, n: int, rng: random.Random) -> list[str]:
    """Distinct sequences of the same length (one substitution each): no cache hit, same cost."""
    out = []
    for i in range(n):
        pos = rng.randrange(len(base))
        out.append(base[:pos] + AA[(AA.index(base[pos]) + 1 + i % 19) % 20] + base[pos + 1:])
    return out


def page_latency(base: str, args, rng: random.Random) -> dict:
    import httpx

    with httpx.Client(base_url=base, timeout=60) as c:
        ov = c.get("/.json", params={"per_page": 500}).json()
        sae = ov["sae_id"]
        live = [r["latent"] for r in ov["latents"]]
        prots = [p["accession"] for p in c.get("/proteins.json", params={"per_page": 500}).json()["proteins"]]
        c.get(f"/latents/{sae}/{live[0]}.json")  # warm-up
        out = {"d_sae": ov["saes"][0]["d_sae"], "corpus_proteins": ov["corpus"]["n_proteins"]}
        for kind, paths in (("latent_json", [f"/latents/{sae}/{rng.choice(live)}.json" for _ in range(args.queries)]),
                            ("protein_json", [f"/proteins/{rng.choice(prots)}.json" for _ in range(args.queries)])):
            ms = []
            for path in paths:
                t = time.perf_counter()
                r = c.get(path)
                ms.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, (path, r.status_code)
            out[kind] = summary(ms)
    return out


def bare_forward(atlas: Path, seqs: list[str], device: str = "cpu", batch_size: int = 8) -> dict:
    """The same pLM layer + SAE encode the server runs, called directly (no HTTP, no queue).

    Timed on a worker thread, as the server computes (its single inference thread), and on the main
    thread for reference: on the 2-core test machine under load the same forward took ~3x longer on
    the main thread than on a worker thread, so only the like-for-like number makes a fair ratio.

    ``batching_ceiling``: what micro-batching can gain at most -- the bare forward's time per
    sequence one at a time over its time per sequence in batches of ``batch_size`` (rounds of each,
    interleaved, so that load from other processes hits both alike), with the forward's GFLOP
    (torch's FLOP counter) and GFLOP/s both ways.  A server cannot batch better than its forward.
    """
    from concurrent.futures import ThreadPoolExecutor
    from statistics import median

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from plmscope.store.reader import AtlasReader
    from plmscope.web.inference import load_models, sparse_activations

    reader = AtlasReader(atlas)
    m = next(iter(load_models(reader, device).values()))
    reader.close()

    def forward(batch: list[str]) -> None:
        for rep in m.plm.representations(batch, m.layer):
            sparse_activations(m.sae, rep)

    def timed() -> list[float]:
        ms = []
        with torch.no_grad():
            forward([seqs[0]])  # warm-up
            for s in seqs:
                t = time.perf_counter()
                forward([s])
                ms.append((time.perf_counter() - t) * 1000)
        return ms

    def ceiling() -> dict:
        pool = (seqs * batch_size)[: max(batch_size, len(seqs))]
        batches = [pool[i:i + batch_size] for i in range(0, len(pool) - batch_size + 1, batch_size)]
        one, many = [], []
        with torch.no_grad():
            forward(batches[0])  # warm-up at the batch shape
            for _ in range(max(1, 3 // len(batches))):
                for b in batches:
                    t = time.perf_counter()
                    for s in b:
                        forward([s])
                    one.append((time.perf_counter() - t) * 1000 / len(b))
                    t = time.perf_counter()
                    forward(b)
                    many.append((time.perf_counter() - t) * 1000 / len(b))
            with FlopCounterMode(display=False) as fc:
                forward([seqs[0]])
        gflop = fc.get_total_flops() / 1e9
        return {"batch_size": batch_size, "forward_gflop_per_seq": round(gflop, 3),
                "ms_per_seq_batch1": round(median(one), 2), f"ms_per_seq_batch{batch_size}": round(median(many), 2),
                "gflops_batch1": round(gflop / median(one) * 1000, 1),
                f"gflops_batch{batch_size}": round(gflop / median(many) * 1000, 1),
                "batching_ceiling": round(median(one) / median(many), 3), "torch_threads": torch.get_num_threads()}

    def gpu_time() -> dict:
        """Per one-sequence forward: wall time against the time the GPU spends in kernels (torch's
        profiler), and the kernels launched: a wall time far above the kernel time means the
        forward is bound by launching kernels from the CPU, not by the GPU."""
        from torch.profiler import ProfilerActivity, profile

        n = 5
        with torch.no_grad():
            forward([seqs[0]])
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t = time.perf_counter()
                for s in seqs[:n]:
                    forward([s])
                wall = (time.perf_counter() - t) * 1000 / n
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1000 / n
        return {"wall_ms_per_seq": round(wall, 2), "kernel_ms_per_seq": round(busy, 2),
                "kernels_per_seq": round(len(kernels) / n), "gpu_busy_fraction": round(busy / wall, 3)}

    with ThreadPoolExecutor(max_workers=1) as ex:
        worker = ex.submit(timed).result()
        ceil = ex.submit(ceiling).result()
        gpu = ex.submit(gpu_time).result() if str(m.plm.device).startswith("cuda") else None
    out = summary(worker)
    out["main_thread"] = summary(timed())
    out["ceiling"] = ceil
    if gpu:
        out["gpu_profile"] = gpu
    return out


def bare_forward_fresh(atlas: Path, seqs: list[str], device: str = "cpu", batch_size: int = 8) -> dict:
    """bare_forward in a new process: nothing left over from the build (threads, allocator) skews it,
    and OpenMP starts with the settings the server's entry point gives it."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"atlas": str(atlas), "seqs": seqs, "device": device, "batch_size": batch_size}, fh)
    from plmscope.threads import prepare_environment

    env = dict(os.environ)
    prepare_environment(env)  # the OpenMP settings `plmscope serve` starts with: only the server's own work differs
    out = subprocess.run([sys.executable, __file__, "--child-bare", fh.name], capture_output=True, text=True, env=env)
    os.unlink(fh.name)
    if out.returncode:
        raise SystemExit(f"bare forward failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_timing(header: str) -> dict[str, float]:
    """``{"queue": ms, "model": ms, "infer": ms}`` from a Server-Timing header."""
    out = {}
    for part in header.split(","):
        name, *params = [x.strip() for x in part.split(";")]
        for p in params:
            if p.startswith("dur="):
                out[name] = float(p[4:])
    return out


def infer_latency(base: str, seqs: list[str]) -> dict:
    """Client-side p50/p99 of ``/api/infer``, split by the server's Server-Timing: ``model`` (its
    pLM + SAE compute), ``queue``, ``infer`` (queue to response model) and ``outside_infer`` (what
    the client waited beyond ``infer``: HTTP, request parsing, serialisation)."""
    import httpx

    ms, parts = [], {"queue": [], "model": [], "infer": [], "outside_infer": []}
    with httpx.Client(base_url=base, timeout=120) as c:
        c.post("/api/infer", json={"sequence": seqs[0][::-1]})  # warm-up
        for s in seqs:
            t = time.perf_counter()
            r = c.post("/api/infer", json={"sequence": s, "top_k": 20})
            ms.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
            st = server_timing(r.headers.get("server-timing", ""))
            for k in ("queue", "model", "infer"):
                parts[k].append(st[k])
            parts["outside_infer"].append(ms[-1] - st["infer"])
    out = summary(ms)
    out["server_timing_p50_ms"] = {k: round(pct(v, 50), 2) for k, v in parts.items()}
    return out


def _pages_meanwhile(base: str, paths: list[str], stop) -> list[float]:
    """Latent JSON pages one after another on their own thread until ``stop`` is set (ms each)."""
    import httpx

    ms = []
    with httpx.Client(base_url=base, timeout=60) as c:
        while not stop.is_set():
            for path in paths:
                if stop.is_set():
                    break
                t = time.perf_counter()
                r = c.get(path)
                ms.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, (path, r.status_code)
    return ms


def throughput_with_pages(base: str, seqs: list[list[str]], paths: list[str]) -> dict:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as ex:
        pages = ex.submit(_pages_meanwhile, base, paths, stop)
        try:
            out = asyncio.run(_throughput(base, seqs))
        finally:
            stop.set()
        out["latent_json_meanwhile"] = summary(pages.result())
    return out


def httpx_get_json(url: str) -> dict:
    import httpx

    return httpx.get(url, timeout=60).json()


def latent_paths(base: str, n: int, rng: random.Random) -> list[str]:
    import httpx

    ov = httpx.get(base + "/.json", params={"per_page": 500}, timeout=60).json()
    live = [r["latent"] for r in ov["latents"]]
    return [f"/latents/{ov['sae_id']}/{rng.choice(live)}.json" for _ in range(n)]


async def _throughput(base: str, seqs: list[list[str]]) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=300) as c:
        async def client(mine: list[str]) -> int:
            ok = 0
            for s in mine:
                r = await c.post("/api/infer", json={"sequence": s})
                ok += r.status_code == 200
            return ok

        t = time.perf_counter()
        oks = await asyncio.gather(*[client(m) for m in seqs])
        dt = time.perf_counter() - t
    n = sum(len(m) for m in seqs)
    return {"requests": n, "ok": sum(oks), "seconds": round(dt, 2), "requests_per_s": round(sum(oks) / dt, 2)}


def run(args) -> dict:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the results
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="plmscope_bench_server_"))
    work.mkdir(parents=True, exist_ok=True)
    atlas = Path(args.atlas) if args.atlas else build_atlas(work, args)
    base_seq = "".join(rng.choice(AA) for _ in range(args.length))
    single = variants(base_seq, args.infer_runs, rng)
    conc = [variants(base_seq, args.per_client, rng) for _ in range(args.clients)]
    results: dict = {"atlas": str(atlas), "length": args.length}
    # the bare forward with no server running, before and after the server's own /api/infer run:
    # the ratio takes their mean, so a drift of the shared machine's speed hits both sides alike
    results["bare_forward"] = bare_forward_fresh(atlas, single, args.device, args.batch_size)
    common = {"rate_limit_per_minute": 0, "cache_size": 0, "infer_queue_size": 4 * args.clients}
    with Server(atlas, args.device, infer_batch_size=args.batch_size, infer_max_wait_ms=args.max_wait_ms, **common) as srv:
        results["api_infer"] = infer_latency(srv.base, single)
        results["pages"] = page_latency(srv.base, args, rng)
        paths = latent_paths(srv.base, 50, rng)
        results["batched_with_pages"] = throughput_with_pages(srv.base, conc, paths)
    for variant in args.infer_variants:
        extra = dict(kv.split("=", 1) for kv in variant.split(","))
        settings = dict(infer_batch_size=args.batch_size, infer_max_wait_ms=args.max_wait_ms, **common) | extra
        with Server(atlas, args.device, **settings) as srv:
            results.setdefault("api_infer_variants", {})[variant] = infer_latency(srv.base, single)
    results["bare_forward_after"] = bare_forward_fresh(atlas, single, args.device, args.batch_size)
    bare = (results["bare_forward"]["p50_ms"] + results["bare_forward_after"]["p50_ms"]) / 2
    results["overhead_ratio_p50"] = round(results["api_infer"]["p50_ms"] / bare, 3)
    # the server's own compute against the bare forward: above 1, the forward itself runs slower in
    # the server (threads, priority, the GIL); the rest of the overhead is outside_infer
    results["server_model_vs_bare_p50"] = round(results["api_infer"]["server_timing_p50_ms"]["model"] / bare, 3)
    with Server(atlas, args.device, infer_batch_size=args.batch_size, infer_max_wait_ms=args.max_wait_ms,
                infer_nice=0, **common) as srv:
        results["batched_same_priority"] = throughput_with_pages(srv.base, conc, paths)
    # the server as configured (micro-batches on its default workers), micro-batching on one worker,
    # and one request at a time on one worker: all three up (an idle one sleeps), rounds alternated
    with Server(atlas, args.device, infer_batch_size=args.batch_size, infer_max_wait_ms=args.max_wait_ms, **common) as b, \
            Server(atlas, args.device, infer_batch_size=args.batch_size, infer_max_wait_ms=args.max_wait_ms,
                   infer_workers=1, **common) as b1, \
            Server(atlas, args.device, infer_batch_size=1, infer_max_wait_ms=0, infer_workers=1, **common) as one:
        rounds = {"batched": [], "batched_one_worker": [], "one_at_a_time": []}
        for _ in range(args.rounds):
            for name, srv in (("batched", b), ("batched_one_worker", b1), ("one_at_a_time", one)):
                rounds[name].append(asyncio.run(_throughput(srv.base, conc)))
        results["workers"] = httpx_get_json(b.base + "/health").get("infer_workers")
    for name, rs in rounds.items():
        n, dt = sum(r["ok"] for r in rs), sum(r["seconds"] for r in rs)
        results[name] = {"requests": sum(r["requests"] for r in rs), "ok": n, "seconds": round(dt, 2),
                         "requests_per_s": round(n / dt, 2), "rounds": len(rs)}
    one_rate = results["one_at_a_time"]["requests_per_s"]
    results["batching_speedup"] = round(results["batched"]["requests_per_s"] / one_rate, 3)
    results["batching_one_worker_speedup"] = round(results["batched_one_worker"]["requests_per_s"] / one_rate, 3)
    results["machine"] = matmul_gflops("cpu")
    loaded = results["batched_with_pages"]["latent_json_meanwhile"]
    ceiling = results["bare_forward"]["ceiling"]
    results["goals"] = {
        "overhead_le_1.1": results["overhead_ratio_p50"] <= 1.1,
        "batching_ge_1.3": results["batching_speedup"] >= 1.3,
        "batching_ceiling": (
            f"the bare forward itself runs {ceiling['batching_ceiling']}x faster per sequence in batches of "
            f"{ceiling['batch_size']} ({ceiling['gflops_batch1']} vs {ceiling[f'gflops_batch{args.batch_size}']} "
            f"GFLOP/s, {ceiling['torch_threads']} torch thread(s), against matmul {results['machine']['gflops']} "
            f"GFLOP/s): micro-batching on one worker gains {results['batching_one_worker_speedup']}x, "
            f"{'within' if results['batching_one_worker_speedup'] <= ceiling['batching_ceiling'] * 1.05 else 'above'} that ceiling; "
            f"the server as configured ({results['workers']} worker(s)) {results['batching_speedup']}x; "
            + ("1.3x is out of reach for this model on this machine" if ceiling["batching_ceiling"] < 1.3
               else "1.3x is within reach of the forward")),
        "latent_json_p99_under_load_le_50ms": loaded["p99_ms"] <= 50,
        "latent_json_p50_unloaded_le_10ms": results["pages"]["latent_json"]["p50_ms"] <= 10,
        "note": f"machine fp32 matmul {results['machine']['gflops']} GFLOP/s; the 10 ms goal is for a quiet machine",
    }
    if args.device.startswith("cuda"):
        results["gpu"] = matmul_gflops(args.device, dtype="bf16")
    return results


def main(argv=None) -> int:
    args = create_parser().parse_args(argv)
    if args.layer is None:
        from plmscope.plm.esm2 import ARCHS

        args.layer = ARCHS[args.arch][0]
    if args.child_bare:
        spec = json.loads(Path(args.child_bare).read_text())
        print(json.dumps(bare_forward(Path(spec["atlas"]), spec["seqs"], spec["device"], spec["batch_size"])))
        return 0
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
