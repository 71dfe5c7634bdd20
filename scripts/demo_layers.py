"""Choose the demo SAE's layer on the selection set and measure it on the report set.

    python scripts/demo_layers.py [--workdir var/demo-layers] [--train-only] [--install]

1. writes the SAE corpus's train / selection / report FASTAs (data/demo/sae_sets.json: whole
   MMseqs2 clusters per set);
2. trains an SAE at each UniRep-256 layer 1-4 on "train" with the demo's settings
   (plmscope.demo.SAE_TRAIN_ARGS, only --layer changed);
3. runs eval-sae on "selection" for each: data/demo/eval/layer{L}.selection.json;
4. picks the layer by the rule in ``choose`` (on selection numbers only) and runs eval-sae on
   "report" for that layer alone: data/demo/eval/layer{L}.report.json;
5. with --install, copies that SAE (cfg.json with the report metrics, weights, sparsity, eval.json)
   into data/demo/sae.  plmscope.demo.DEMO_LAYER must name the chosen layer.

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

from plmscope import demo
from plmscope.cli import main as plmscope

EVAL_DIR = demo.DATA / "eval"
LAYERS = (1, 2, 3, 4)


def choose(selection: dict[int, dict]) -> int:
    """The layer whose SAE recovers the largest share of the loss gap against mean-ablation on the
    selection set (the headline eval-sae reports); every SAE has the same size and sparsity."""
    return max(selection, key=lambda layer: selection[layer]["headline"]["loss_recovered_vs_mean_ablation_pct"]["value"])


def _run(argv: list[str]) -> None:
    t0 = time.perf_counter()
    print("plmscope", " ".join(argv), flush=True)
    if plmscope(argv) != 0:
        raise SystemExit(f"plmscope {argv[0]} failed")
    print(f"  took {time.perf_counter() - t0:.0f} s", flush=True)


def _evaluate(sae: Path, fasta: Path, name: str, out: Path) -> dict:
    if not out.is_file():
        _run(["eval-sae", "--sae", str(sae), "--fasta", str(fasta), "--set", name])
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sae / "eval.json", out)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=demo.REPO / "var" / "demo-layers")
    ap.add_argument("--train-only", action="store_true", help="stop after training the four SAEs")
    ap.add_argument("--install", action="store_true", help="copy the chosen SAE into data/demo/sae")
    args = ap.parse_args()
    fastas = demo.write_sae_fastas(args.workdir)
    at = demo.SAE_TRAIN_ARGS.index("--layer") + 1
    args_for = {layer: [*demo.SAE_TRAIN_ARGS[:at], str(layer), *demo.SAE_TRAIN_ARGS[at + 1:]] for layer in LAYERS}
    for layer in LAYERS:
        out = args.workdir / f"L{layer}"
        if not (out / "cfg.json").is_file():
            _run(["train-sae", *args_for[layer], "--fasta", str(fastas["train"]), "--out", str(out)])
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
    if args.train_only:
        return 0
    selection = {layer: _evaluate(args.workdir / f"L{layer}", fastas["selection"], "selection",
                                  EVAL_DIR / f"layer{layer}.selection.json") for layer in LAYERS}
    best = choose(selection)
    print(f"chosen on the selection set: layer {best}", flush=True)
    chosen = args.workdir / f"L{best}"
    _evaluate(chosen, fastas["report"], "report", EVAL_DIR / f"layer{best}.report.json")
    if args.install:
        if best != demo.DEMO_LAYER:
            raise SystemExit(f"layer {best} was chosen but plmscope.demo.DEMO_LAYER is {demo.DEMO_LAYER}; "
                             f"change it first")
        for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "eval.json"):
            shutil.copyfile(chosen / name, demo.COMMITTED_SAE / name)
        print(f"installed {chosen} as {demo.COMMITTED_SAE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
