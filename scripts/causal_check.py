#!/usr/bin/env python
"""Does ablating a concept's latents hurt the model's predictions inside that concept more than
ablating latents of the same density that are not associated with any concept?

On an analysed atlas (``plmscope demo --no-serve`` builds one), for every associated latent-concept
pair (``latent_concepts.associated``) and up to ``--proteins`` proteins carrying the concept:

* ``drop`` of a latent on a protein = mean over the concept's residues of
  log p_clean(residue) - log p_ablated(residue) (the latent ablated on every residue, error term kept;
  ``causal.intervene``), in nats;
* controls: the ``--controls`` live latents whose residue density (``latents.frac_residues``) is
  closest to the associated latent's, associated with no concept;
* difference per pair = mean over its proteins of drop(associated) - mean drop(controls).

Prints the mean difference with a 95 % percentile-bootstrap interval over pairs, the share of pairs
with a positive difference, and the same with the drop measured outside the concept (a latent that
just hurts everywhere would show there too).

    python scripts/causal_check.py --atlas var/demo/atlas.duckdb
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", required=True)
    p.add_argument("--proteins", type=int, default=6, help="proteins per pair")
    p.add_argument("--controls", type=int, default=3, help="density-matched control latents per associated latent")
    p.add_argument("--max-pairs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sae", default=None, help="SAE id (default: the atlas's SAE with the most associated pairs)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from plmscope.analysis.run import Corpus
    from plmscope.causal.intervene import Edit, Intervention, make_splice
    from plmscope.plm import load_plm
    from plmscope.sae.io import sae_from_bytes
    from plmscope.store import analysis_reads as reads
    from plmscope.store.reader import connect, read_sae_weights, read_saes

    con = connect(args.atlas)
    rows = read_saes(con)
    if args.sae:
        rows = [r for r in rows if r["sae_id"] == args.sae]
        if not rows:
            raise SystemExit(f"{args.atlas} has no SAE {args.sae!r}")
    sae_row = max(rows, key=lambda r: len(reads.associated_pairs(con, r["sae_id"])))
    sid = sae_row["sae_id"]
    pairs = reads.associated_pairs(con, sid)[: args.max_pairs]
    density = reads.latent_densities(con, sid)
    corpus = Corpus.load(con)
    cfg, weights = read_sae_weights(con, sid, args.atlas)
    con.close()
    if not pairs:
        print(json.dumps({"result": "no associated latent-concept pairs in this atlas; nothing to test"}))
        return
    plm = load_plm(sae_row["plm"], args.device)
    sae = sae_from_bytes(cfg, weights).to(plm.device).eval()
    associated = {lat for lat, _, _ in pairs}
    candidates = np.array([lat for lat, d in density.items() if lat not in associated and d > 0])
    cand_d = np.array([density[int(c)] for c in candidates])
    regions = defaultdict(lambda: defaultdict(list))  # concept -> protein -> [(s, e)]
    for i, concept, s, e in corpus.regions:
        regions[concept][i].append((s, e))
    rng = np.random.default_rng(args.seed)
    results = []
    with torch.no_grad():
        for lat, concept, f1 in pairs:
            controls = candidates[np.argsort(np.abs(cand_d - density[lat]), kind="stable")[: args.controls]].tolist()
            prots = sorted(regions[concept])
            prots = [prots[i] for i in rng.permutation(len(prots))[: args.proteins]]
            diffs_in, diffs_out = [], []
            for i in prots:
                seq = corpus.sequences[i][: corpus.lengths[i]]
                inside = np.zeros(len(seq), bool)
                for s, e in regions[concept][i]:
                    inside[s:e] = True
                latents = [lat] + controls
                ivs = [None] + [Intervention((Edit(x, "ablate"),)) for x in latents]
                outs = plm.splice_forward([seq] * len(ivs), sae.layer, make_splice(sae, ivs, [len(seq)] * len(ivs)))
                target = torch.tensor([plm.target_class(a) for a in seq])
                lp = [o.logprobs[torch.arange(len(seq)), target].double().numpy() for o in outs]
                drops = [lp[0] - x for x in lp[1:]]
                diffs_in.append(drops[0][inside].mean() - np.mean([d[inside].mean() for d in drops[1:]]))
                if (~inside).any():
                    diffs_out.append(drops[0][~inside].mean() - np.mean([d[~inside].mean() for d in drops[1:]]))
            results.append({"latent": lat, "concept": concept, "test_f1": f1, "controls": controls,
                            "n_proteins": len(prots), "diff_inside": float(np.mean(diffs_in)),
                            "diff_outside": float(np.mean(diffs_out)) if diffs_out else None})

    def summary(key: str) -> dict:
        x = np.array([r[key] for r in results if r[key] is not None])
        boot = [rng.choice(x, len(x)).mean() for _ in range(2000)]
        return {"mean_nats": round(float(x.mean()), 5), "ci95": [round(float(np.percentile(boot, 2.5)), 5),
                round(float(np.percentile(boot, 97.5)), 5)], "share_positive": round(float((x > 0).mean()), 3),
                "standardised_mean": round(float(x.mean() / x.std(ddof=1)), 3) if len(x) > 1 and x.std() > 0 else None}

    print(json.dumps({"atlas": args.atlas, "sae": sid, "n_pairs": len(results),
                      "inside_concept": summary("diff_inside"), "outside_concept": summary("diff_outside"),
                      "pairs": results}, indent=1))


if __name__ == "__main__":
    main()
