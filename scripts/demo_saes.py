"""Train the demo's SAEs, choose their settings on the selection set and measure them on the report set.

    python scripts/demo_saes.py [--workdir var/demo-saes] [--train-only] [--install]

1. writes the SAE corpus's train / selection / report FASTAs (data/demo/sae_sets.json: whole
   MMseqs2 clusters per set);
2. trains, in one UniRep-256 pass over "train", an SAE at each layer with the demo's settings
   (plmscope.demo.SAE_TRAIN_ARGS) and the sweep at layer SWEEP_LAYER (SWEEP: k and dictionary size);
   each SAE is bit-identical to one trained alone, so SAEs may also be trained in separate passes;
3. runs eval-sae on "selection" for every SAE: data/demo/eval/<name>.selection.json;
4. chooses the dictionary size and k by ``choose`` on the sweep layer's selection numbers only;
5. runs eval-sae on "report" for the four demo SAEs: data/demo/eval/<name>.report.json;
6. builds the demo corpus with the sweep layer's SAEs, analyzes it and writes the sweep table
   (selection-set reconstruction and loss, associated concepts) to data/demo/eval/sweep.json;
7. with --install, copies the four demo SAEs (cfg.json with the report metrics, weights, sparsity,
   eval.json) into data/demo/sae.

Every step is skipped when its output exists, so the script can be run again after an interruption.
scripts/sae_table.py prints the README's table from the JSON files this writes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import duckdb

from plmscope import demo
from plmscope.cli import main as plmscope
from plmscope.sae.train import run_name

EVAL_DIR = demo.DATA / "eval"
SWEEP_LAYER = 3
# the settings compared at SWEEP_LAYER: k at 1,024 latents, and dictionary size at k = 32
SWEEP = [(SWEEP_LAYER, 1024, 16), (SWEEP_LAYER, 1024, 32), (SWEEP_LAYER, 1024, 64), (SWEEP_LAYER, 512, 32),
         (SWEEP_LAYER, 2048, 32)]
EVAL_SPEED = ["--token-budget", "65536", "--loss-token-budget", "65536"]  # UniRep's step is cheaper in wide batches
MAX_COST_PCT = 10.0  # of the model's gain over amino-acid frequencies (see choose)


def demo_names() -> list[str]:
    return [run_name("topk", layer, demo.DEMO_LATENTS, demo.DEMO_K) for layer in demo.DEMO_LAYERS]


def sweep_names() -> list[str]:
    return [run_name("topk", *s) for s in SWEEP]


def all_names() -> list[str]:
    """Every SAE trained: the demo's four and the sweep (the demo's layer-3 SAE is one of the sweep's)."""
    return demo_names() + [n for n in sweep_names() if n not in demo_names()]


def choose(selection: dict[str, dict]) -> tuple[int, int]:
    """(latents, k) for the demo, from the sweep layer's selection-set numbers: the smallest k, then
    the fewest latents, whose splice costs at most MAX_COST_PCT % of what the model predicts beyond
    amino-acid frequencies (sparse codes are easier to read; a splice that costs more would make the
    atlas describe a different model); when none does, the setting whose splice costs least."""
    rows = [(r["d_sae"], r["k"], r["headline"]["splice_cost_pct_of_model_gain"]["value"])
            for r in selection.values() if r["layer"] == SWEEP_LAYER]
    ok = sorted((k, n) for n, k, cost in rows if cost <= MAX_COST_PCT)
    if ok:
        k, n = ok[0]
        return n, k
    n, k, _ = min(rows, key=lambda r: r[2])
    return n, k


def _run(argv: list[str]) -> None:
    t0 = time.perf_counter()
    print("plmscope", " ".join(argv), flush=True)
    if plmscope(argv) != 0:
        raise SystemExit(f"plmscope {argv[0]} failed")
    print(f"  took {time.perf_counter() - t0:.0f} s", flush=True)


def _evaluate(saes: list[Path], fasta: Path, name: str, outs: list[Path]) -> list[dict]:
    """eval-sae on ``fasta`` for the SAEs whose result file is missing (one run: shared passes once)."""
    todo = [(s, o) for s, o in zip(saes, outs) if not o.is_file()]
    if todo:
        _run(["eval-sae", "--sae", *[str(s) for s, _ in todo], "--fasta", str(fasta), "--set", name, *EVAL_SPEED])
        for s, o in todo:
            o.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s / "eval.json", o)
    return [json.loads(o.read_text()) for o in outs]


def _atlas_groups(names: list[str]) -> list[list[str]]:
    """The sweep SAEs in as few atlases as their ids allow (an atlas holds one SAE per id, and the
    id names layer and size, not k)."""
    from plmscope.sae.io import read_cfg, sae_id

    groups: list[tuple[set, list[str]]] = []
    for n in names:
        sid = sae_id(read_cfg(n))
        for ids, members in groups:
            if sid not in ids:
                ids.add(sid)
                members.append(n)
                break
        else:
            groups.append(({sid}, [n]))
    return [members for _, members in groups]


def sweep_table(grid: Path, workdir: Path, selection: dict[str, dict]) -> list[dict]:
    """One row per sweep SAE: selection-set numbers and the concepts analyze associates on the demo corpus."""
    corpus = demo.write_corpus(workdir / "corpus.tsv", 3000)
    summaries = {}
    for g, members in enumerate(_atlas_groups([grid / n for n in sweep_names()])):
        atlas = workdir / f"sweep{g}.duckdb"
        if not atlas.is_file():
            tmp = workdir / f"sweep{g}.tmp.duckdb"
            tmp.unlink(missing_ok=True)
            _run(["build", "--corpus", str(corpus), *[x for d in members for x in ("--sae", str(d))],
                  "--out", str(tmp), "--families", str(demo.DATA / "pfam_families.tsv"), "--token-budget", "65536"])
            # concepts are what the sweep needs; every annotated protein, as the demo's analyze
            _run(["analyze", "--atlas", str(tmp), "--output-effect-examples", "0", "--max-proteins", "3000"])
            tmp.replace(atlas)
        con = duckdb.connect(str(atlas), read_only=True)
        rows = con.execute("SELECT s.layer, s.d_sae, s.k, a.summary FROM analysis_summary a JOIN saes s USING (sae_id)").fetchall()
        con.close()
        summaries.update({(layer, d, k): json.loads(s) for layer, d, k, s in rows})
    rows = []
    for name in sweep_names():
        r = selection[name]
        concepts = summaries[(r["layer"], r["d_sae"], r["k"])].get("concepts") or {}
        rows.append({"layer": r["layer"], "d_sae": r["d_sae"], "k": r["k"], "set": "selection",
                     "explained_variance": r["explained_variance"],
                     "splice_delta_nats": r["headline"]["splice_delta_nats"]["value"],
                     "splice_cost_pct_of_model_gain": r["headline"]["splice_cost_pct_of_model_gain"]["value"],
                     "loss_recovered_vs_mean_ablation_pct": r["headline"]["loss_recovered_vs_mean_ablation_pct"]["value"],
                     "dead_fraction": r["dead_fraction"],
                     "associated_concepts": concepts.get("n_associated_concepts"),
                     "associated_pairs": concepts.get("n_associated_pairs"),
                     "associated_latents": concepts.get("n_associated_latents"),
                     "concepts_set": "InterPLM's rule, validation and test splits of the demo corpus (analyze)"})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=demo.REPO / "var" / "demo-saes")
    ap.add_argument("--train-only", action="store_true", help="stop after training")
    ap.add_argument("--install", action="store_true", help="copy the four demo SAEs into data/demo/sae")
    args = ap.parse_args()
    fastas = demo.write_sae_fastas(args.workdir)
    grid = args.workdir / "grid"
    names = all_names()
    if not all((grid / n / "cfg.json").is_file() for n in names):
        demo_set = {(layer, demo.DEMO_LATENTS, demo.DEMO_K) for layer in demo.DEMO_LAYERS}
        also = [x for s in SWEEP if s not in demo_set for x in ("--also", ":".join(map(str, s)))]
        _run(["train-sae", *demo.SAE_TRAIN_ARGS, *also, "--fasta", str(fastas["train"]), "--out", str(grid),
              "--resume" if (grid / "checkpoint").exists() else "--checkpoint-every=500"])
    if args.train_only:
        return 0
    selection = dict(zip(names, _evaluate([grid / n for n in names], fastas["selection"], "selection",
                                          [EVAL_DIR / f"{n}.selection.json" for n in names])))
    latents, k = choose(selection)
    print(f"chosen on the selection set at layer {SWEEP_LAYER}: {latents} latents, k = {k}", flush=True)
    if (latents, k) != (demo.DEMO_LATENTS, demo.DEMO_K):
        raise SystemExit(f"the rule chose {latents} latents, k = {k}, but plmscope.demo trains "
                         f"{demo.DEMO_LATENTS}, k = {demo.DEMO_K}: change DEMO_LATENTS / DEMO_K and run again")
    _evaluate([grid / n for n in demo_names()], fastas["report"], "report",
              [EVAL_DIR / f"{n}.report.json" for n in demo_names()])
    sweep = demo.SWEEP_FILE
    if not sweep.is_file():
        rows = sweep_table(grid, args.workdir, selection)
        sweep.write_text(json.dumps({"command": "python scripts/demo_saes.py", "layer": SWEEP_LAYER,
                                     "rule": choose.__doc__.split("\n\n")[0].replace("\n   ", ""),
                                     "chosen": {"d_sae": latents, "k": k}, "rows": rows}, indent=1) + "\n")
    if args.install:
        for n in demo_names():
            dst = demo.COMMITTED_SAES / n
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "eval.json"):
                shutil.copyfile(grid / n / f, dst / f)
            print(f"installed {grid / n} as {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
