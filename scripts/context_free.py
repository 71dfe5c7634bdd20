"""How far into a protein does a causal pLM's representation carry no protein context?

    python scripts/context_free.py [--model unirep-256] [--proteins 400] [--positions 12]

For each layer and each position p = 1..--positions, over the demo's SAE "selection" proteins
(data/demo/sae_sets.json), it prints:

* ``spread``: the mean squared distance of the proteins' representations at position p to their
  mean at p, as a fraction of the same quantity over all residues of all proteins.  A position
  whose representation is (nearly) the same in every protein has a spread near 0;
* ``distinct``: how many different residue prefixes (residues 1..p) the proteins have there.

A left-to-right model's state at position p depends only on residues 1..p, so its spread is bounded
by how many prefixes exist.  The rule in plmscope (``ProteinLM.context_free_positions``) is chosen
from this table: see the README's "Context-free positions".
"""

from __future__ import annotations

import argparse
import sys

import torch

from plmscope import demo
from plmscope.plm.base import load_plm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=demo.DEMO_MODEL)
    ap.add_argument("--proteins", type=int, default=400)
    ap.add_argument("--positions", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sets = demo.read_sae_sets()
    seqs = [s for a, s in demo.sae_corpus() if sets[a] == "selection"][: args.proteins]
    plm = load_plm(args.model, "cpu")
    P = args.positions
    print(f"{args.model}, {len(seqs)} demo selection proteins; spread = per-position variance across "
          f"proteins / variance over all residues")
    print("position " + " ".join(f"{p:>6d}" for p in range(1, P + 1)))
    print("distinct " + " ".join(f"{len({s[:p] for s in seqs}):>6d}" for p in range(1, P + 1)))
    for layer in range(1, plm.num_layers + 1):
        reps = plm.representations(seqs, layer)
        allr = torch.cat(reps)
        total = (allr - allr.mean(0)).pow(2).sum(1).mean()
        spread = []
        for p in range(P):
            x = torch.stack([r[p] for r in reps if r.shape[0] > p])
            spread.append(float((x - x.mean(0)).pow(2).sum(1).mean() / total))
        print(f"layer {layer:<2d} " + " ".join(f"{v:6.3f}" for v in spread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
