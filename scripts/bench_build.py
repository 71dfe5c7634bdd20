"""Benchmark `plmscope build`: throughput vs bare pLM extraction, peak RSS vs corpus size, and query
latency of the web app's reads on the resulting atlas.

Setup (all local, no downloads): ESM-2 8M architecture with random weights (``save_random_esm2``),
a TopK SAE with 4096 latents (random init), demo proteins (``data/demo/proteins.tsv.gz``).

    python scripts/bench_build.py --proteins 2000                  # throughput + queries
    python scripts/bench_build.py --proteins 2000 --rss 2000 20000  # + peak RSS, one subprocess each
    python scripts/bench_build.py --proteins 500 --rss 2000 20000 --rss-plm tiny
        # peak RSS with a tiny random ESM-2 (2 layers, 64 dims) so 20k proteins finish in minutes;
        # the SAE is still 4096 latents (same aggregation state), only its d_in follows the pLM

    python scripts/bench_build.py --ray --proteins 600    # Ray: 1 and 2 workers against one process

    python scripts/bench_build.py --merge-shards 16 --proteins 1000 --plm tiny  # merge of many shards

``--merge-shards N``: the corpus built as N shard states (``--shard i/N --state-out``, chunks of
proteins/N, one after the other in this process), then ``plmscope merge`` of the N states timed;
printed: seconds per shard, state MiB per shard, merge seconds and the atlas's MiB.

``--ray``: the same build, each in a fresh process (``OMP_NUM_THREADS=1``, 4 chunks), as one process and as
``build --ray`` on a local cluster with 1 and with 2 workers (one shard per worker, 1 CPU each),
``--repeats`` times in turn; ``ratio_ray<w>`` = the single-process time over the Ray build's
(mean of the runs), so 1-worker overhead = 1 / ratio_ray1 - 1 (goal <= 10 %) and ratio_ray2 is the
2-worker speed-up.  The Ray times include starting the local cluster and the workers' model
loads, as a user's ``build --ray`` pays them.

Throughput: the same proteins in the same run: bare extraction (``plm.iter_representations``
alone), then ``--repeats`` times the full build (forward + SAE encode + aggregation + spill +
checkpoint + writing the atlas) followed by bare extraction again; an untimed warm-up forward
comes first (``--isolated``: every run in a fresh process, no warm-up, as a CLI build runs).
``ratio`` = mean build residues/s over mean bare residues/s (the ratio of the mean times); also
printed: ``ratio_paired``, each build against the mean of the bare runs just before and after it
(the machine's speed drifts over a run of many minutes), with its median, and
``ratio_best_of``, the fastest run of each, which is biased: it takes the minimum of R + 1 bare
runs against R builds, and in the in-process mode a process's first bare run tends to be its fastest.  Target >= 0.9.  The build's own stage timings
(of the last build) are printed too.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proteins", type=int, default=2000, help="proteins for the throughput run")
    p.add_argument("--rss", type=int, nargs="*", default=[], help="corpus sizes for peak-RSS subprocesses")
    p.add_argument("--plm", choices=["esm2_8M", "tiny"], default="esm2_8M", help="pLM of the throughput run")
    p.add_argument("--rss-plm", choices=["esm2_8M", "tiny"], help="pLM of the peak-RSS runs (default: --plm)")
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--queries", type=int, default=200, help="calls per query kind")
    p.add_argument("--repeats", type=int, default=2, help="builds, each followed by a bare extraction")
    p.add_argument("--pipeline", type=int, choices=[0, 1], default=1, help="the build's --pipeline")
    p.add_argument("--checkpoint-every", type=float, default=None,
                   help="the build's --checkpoint-every (default: the build's; 0 = after every chunk, the "
                        "worst case of the checkpoint cost, reported as checkpoint_share)")
    p.add_argument("--chunk-size", type=int, default=1024, help="the build's --chunk-size")
    p.add_argument("--workdir", help="keep inputs and atlas here (default: a temp dir)")
    p.add_argument("--isolated", action="store_true",
                   help="each bare extraction and build in a fresh process (no warm-up), as a CLI build runs")
    p.add_argument("--ray", action="store_true", help="compare build --ray (1 and 2 workers) with one process")
    p.add_argument("--merge-shards", type=int, help="time plmscope merge of this many shard states")
    p.add_argument("--child-build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-bare", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup(work: Path, n: int, args) -> dict:
    import torch

    from plmscope.plm.esm2 import save_random_esm2
    from plmscope.sae.io import save_sae
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    if args.plm == "tiny":
        plm, d_in, layer = work / "esm2_tiny_random.pt", 64, 2
        if not plm.exists():
            save_random_esm2(plm, None, num_layers=2, embed_dim=64, attention_heads=4, seed=0)
    else:
        plm, d_in, layer = work / "esm2_8M_random.pt", 320, args.layer
        if not plm.exists():
            save_random_esm2(plm, "esm2_t6_8M_UR50D", seed=0)
    args.layer = layer
    sae_dir = work / f"sae{args.latents}-{args.plm}"
    if not (sae_dir / "cfg.json").exists():
        cfg = make_cfg(plm=str(plm), layer=layer, d_in=d_in, d_sae=args.latents, architecture="topk", k=args.k)
        save_sae(SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0)), sae_dir)
    corpus = work / f"corpus{n}.tsv"
    if not corpus.exists():
        with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
            rows = [r for r in csv.DictReader(fh, delimiter="\t") if int(r["length"]) <= 1022]
        rows = random.Random(0).sample(rows, min(n, len(rows)))
        with open(corpus, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
            w.writeheader()
            w.writerows(rows)
    return {"plm": str(plm), "sae": str(sae_dir), "corpus": str(corpus)}


def build_argv(inp: dict, out: Path, args) -> list[str]:
    return ["build", "--corpus", inp["corpus"], "--sae", inp["sae"], "--out", str(out), "--device", "cpu",
            "--token-budget", str(args.token_budget), "--chunk-size", str(args.chunk_size), "--pipeline", str(args.pipeline),
            *(["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every is not None else [])]


def bare_extraction(inp: dict, args, warm_up: bool = False) -> tuple[int, float]:
    from plmscope.plm.base import load_plm
    from plmscope.sequences import read_proteins

    prots = read_proteins(inp["corpus"]).proteins
    plm = load_plm(inp["plm"], "cpu")
    if warm_up:  # first calls pay for allocations and kernel selection; the build never sees them
        list(plm.iter_representations([(p.accession, p.sequence) for p in prots[:16]], args.layer,
                                      token_budget=args.token_budget))
    t = time.perf_counter()
    n = 0
    # the build streams chunks of 1024 proteins; do the same here so batching is identical
    for a in range(0, len(prots), 1024):
        items = [(p.accession, p.sequence) for p in prots[a : a + 1024]]
        for _, _, rep in plm.iter_representations(items, args.layer, token_budget=args.token_budget,
                                                  sort_window=len(items)):
            n += rep.shape[0]
    return n, time.perf_counter() - t


def child_build(args) -> None:
    from plmscope.cli import main

    work = Path(args.workdir)
    inp = setup(work, args.proteins, args)
    out = work / f"rss{args.proteins}.duckdb"
    out.unlink(missing_ok=True)
    from plmscope.cli import build_parser

    build_parser("build")  # imports outside the timed part, as for the bare extraction
    t = time.perf_counter()
    rc = main(build_argv(inp, out, args))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"rc": rc, "plm": args.plm, "pipeline": args.pipeline, "proteins": args.proteins, "peak_rss_mib": round(rss, 1),
                      "seconds": round(time.perf_counter() - t, 1)}))


def child_bare(args) -> None:
    inp = setup(Path(args.workdir), args.proteins, args)
    n, t = bare_extraction(inp, args)
    print(json.dumps({"residues": n, "seconds": round(t, 2)}))


def _child(kind: str, args, *, proteins: int, plm: str) -> tuple[dict | None, str]:
    """One ``--child-bare`` or ``--child-build`` in a fresh process: (its JSON line, stderr)."""
    proc = subprocess.run([sys.executable, __file__, f"--child-{kind}", "--proteins", str(proteins),
                           "--workdir", str(args.workdir), "--plm", plm, "--latents", str(args.latents),
                           "--k", str(args.k), "--layer", str(args.layer), "--token-budget", str(args.token_budget),
                           "--pipeline", str(args.pipeline), "--chunk-size", str(args.chunk_size),
                           *(["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every is not None else [])],
                          capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return (json.loads(line[-1]) if line else None), proc.stderr


def _isolated(kind: str, args) -> dict:
    out, err = _child(kind, args, proteins=args.proteins, plm=args.plm)
    if out is None:
        raise SystemExit(f"--child-{kind} failed: {err[-2000:]}")
    return out


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def query_latency(atlas: Path, n: int) -> dict:
    from plmscope.store.reader import AtlasReader

    r = AtlasReader(atlas)
    sae_id = r.saes()[0]["sae_id"]
    con = r._con  # only to pick random keys to ask for
    latents = [x[0] for x in con.execute("SELECT latent FROM latents WHERE NOT is_dead").fetchall()]
    accs = [x[0] for x in con.execute("SELECT accession FROM proteins").fetchall()]
    rng = random.Random(0)
    kinds = {
        "latent detail (stats + all examples)": lambda: r.latent(sae_id, rng.choice(latents)),
        "latent list page (50, sorted)": lambda: r.latent_list(sae_id, sort="frac_proteins", offset=rng.randrange(0, 4000, 50)),
        "protein page (protein + top latents)": lambda: (r.protein(a := rng.choice(accs)), r.protein_top_latents(sae_id, a)),
    }
    out = {}
    for name, fn in kinds.items():
        fn()  # warm
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000)
        out[name] = {"p50_ms": round(percentile(ts, 50), 2), "p99_ms": round(percentile(ts, 99), 2)}
    r.close()
    return out


def run(args) -> dict:
    from plmscope.cli import main

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    inp = setup(work, args.proteins, args)
    from plmscope.cli import build_parser

    build_parser("build")  # import the build module now, so the timed build does not pay for imports
    if args.ray:
        return ray_bench(inp, work, args)
    if args.merge_shards:
        return merge_bench(inp, work, args)
    if args.isolated:
        args.workdir = str(work)
        first = _isolated("bare", args)
        res_bare, t = first["residues"], first["seconds"]
    else:
        res_bare, t = bare_extraction(inp, args, warm_up=True)
    t_bares, t_builds = [t], []
    print(f"bare extraction: {res_bare} residues in {t:.1f} s", file=sys.stderr, flush=True)
    out = work / "bench.duckdb"
    for _ in range(args.repeats):  # bare, (build, bare) x repeats: each build between two bare runs
        out.unlink(missing_ok=True)  # a fresh atlas, not an SAE added to an old one
        if args.isolated:  # the child build writes rss<N>.duckdb
            out = work / f"rss{args.proteins}.duckdb"
            t_builds.append(_isolated("build", args)["seconds"])
            t_bares.append(_isolated("bare", args)["seconds"])
        else:
            t = time.perf_counter()
            assert main(build_argv(inp, out, args)) == 0
            t_builds.append(time.perf_counter() - t)
            t_bares.append(bare_extraction(inp, args)[1])
        print(f"build {t_builds[-1]:.1f} s, bare extraction again {t_bares[-1]:.1f} s", file=sys.stderr, flush=True)
    t_bare, t_build = min(t_bares), min(t_builds)
    mean_ratio = (sum(t_bares) / len(t_bares)) / (sum(t_builds) / len(t_builds))
    # each build against the mean of the bare runs just before and after it: follows the
    # machine's drift over the run, which best-of and the plain means do not
    paired = sorted((t_bares[i] + t_bares[i + 1]) / 2 / t_builds[i] for i in range(len(t_builds)))
    paired_median = (paired[(len(paired) - 1) // 2] + paired[len(paired) // 2]) / 2
    import duckdb

    con = duckdb.connect(str(out), read_only=True)
    summary = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'summary'").fetchone()[0])
    con.close()
    report = {
        "plm": args.plm, "pipeline": args.pipeline, "isolated": args.isolated, "proteins": args.proteins, "residues": res_bare, "latents": args.latents, "k": args.k, "layer": args.layer,
        "bare_residues_per_s": round(res_bare * len(t_bares) / sum(t_bares), 1),
        "build_residues_per_s": round(res_bare * len(t_builds) / sum(t_builds), 1),
        "bare_s": [round(x, 1) for x in t_bares], "build_s": [round(x, 1) for x in t_builds],
        "ratio": round(mean_ratio, 3), "ratio_best_of": round(t_bare / t_build, 3),
        "ratio_paired": [round(x, 3) for x in paired], "ratio_paired_median": round(paired_median, 3),
        "build_stage_s": summary["timings"], "encode": {k: {"path": v.get("encode"), **(v.get("encode_stats") or {})}
                                                        for k, v in summary["saes"].items()},
        "atlas_mib": round(out.stat().st_size / 2**20, 1),
        # seconds of the last build spent writing checkpoints, over its wall time: the throughput cost
        # of resumability (the lost-work bound is --checkpoint-every + one chunk, docs/atlas.md)
        "checkpoint_share": round(summary["timings"].get("checkpoint", 0.0) / t_builds[-1], 4),
        "checkpoint_every": args.checkpoint_every, "chunk_size": args.chunk_size,
    }
    if args.checkpoint_every == 0:  # one checkpoint per chunk: the cost of one
        report["checkpoint_s_each"] = round(summary["timings"].get("checkpoint", 0.0)
                                            / -(-args.proteins // args.chunk_size), 3)
    report["queries"] = query_latency(out, args.queries)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import matmul_gflops

    report["machine"] = matmul_gflops()
    report["rss"] = []
    for n in args.rss:
        args.workdir = str(work)
        child, err = _child("build", args, proteins=n, plm=args.rss_plm or args.plm)
        report["rss"].append(child or {"proteins": n, "error": err[-500:]})
    print(json.dumps(report, indent=1))
    if tmp:
        tmp.cleanup()
    return report


def _mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


def merge_bench(inp: dict, work: Path, args) -> dict:
    """N shard states of the corpus, then ``plmscope merge`` of them, timed."""
    import shutil

    from plmscope.cli import main

    n = args.merge_shards
    args.chunk_size = -(-args.proteins // n)  # one chunk per shard
    root = work / f"merge-bench-{n}"
    shutil.rmtree(root, ignore_errors=True)
    states, t_shards = [], []
    for i in range(n):
        st = root / f"shard{i}"
        argv = [a for a in build_argv(inp, root / "unused.duckdb", args)]
        t = time.perf_counter()
        assert main([*argv, "--shard", f"{i}/{n}", "--state-out", str(st)]) == 0
        t_shards.append(time.perf_counter() - t)
        states.append(st)
    out = root / "merged.duckdb"
    t = time.perf_counter()
    assert main(["merge", *sum((["--state", str(s)] for s in states), []), "--out", str(out)]) == 0
    t_merge = time.perf_counter() - t
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import matmul_gflops

    sizes = [_mib(s) for s in states]
    report = {"plm": args.plm, "proteins": args.proteins, "latents": args.latents, "k": args.k, "shards": n,
              "shard_build_s_mean": round(sum(t_shards) / n, 2), "state_mib_per_shard_mean": round(sum(sizes) / n, 2),
              "state_mib_total": round(sum(sizes), 1), "merge_s": round(t_merge, 2),
              "atlas_mib": round(out.stat().st_size / 2**20, 1), "machine": matmul_gflops()}
    print(json.dumps(report, indent=1))
    return report


def ray_bench(inp: dict, work: Path, args) -> dict:
    """One process vs ``build --ray`` with 1 and 2 workers, each build a fresh CLI process."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args.chunk_size = -(-args.proteins // 4)  # 4 chunks: 2 workers get 2 each (the same for every build)
    kinds = {"single": [], "ray1": ["--ray", "--ray-workers", "1"], "ray2": ["--ray", "--ray-workers", "2"]}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    shards: dict[str, list] = {}
    for _ in range(args.repeats):
        for kind, extra in kinds.items():
            out = work / f"ray-bench-{kind}.duckdb"
            out.unlink(missing_ok=True)
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "plmscope.cli", *build_argv(inp, out, args), *extra],
                                  env=env, capture_output=True, text=True)
            times[kind].append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise SystemExit(f"{kind} build failed: {proc.stderr[-2000:]}")
            print(f"{kind}: {times[kind][-1]:.1f} s", file=sys.stderr, flush=True)
            if kind != "single":
                import duckdb

                con = duckdb.connect(str(out), read_only=True)
                summary = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'summary'").fetchone()[0])
                con.close()
                shards[kind] = [s["seconds"] for s in summary["shards"]]
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import matmul_gflops

    report = {"plm": args.plm, "proteins": args.proteins, "latents": args.latents, "repeats": args.repeats,
              "seconds": {k: [round(x, 1) for x in v] for k, v in times.items()},
              "shard_seconds_last": shards,
              "ratio_ray1": round(mean["single"] / mean["ray1"], 3),
              "ratio_ray2": round(mean["single"] / mean["ray2"], 3),
              "ray1_overhead": round(mean["ray1"] / mean["single"] - 1, 3),
              "cpus": os.cpu_count(), "machine": matmul_gflops()}
    print(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_build:
        child_build(args)
        return 0
    if args.child_bare:
        child_bare(args)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
