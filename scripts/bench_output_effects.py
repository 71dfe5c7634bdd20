#!/usr/bin/env python
"""The analyze step "output effects" (``causal.output_effect.output_effects``) against the path it
replaced, as ratios measured in one run on this machine.

Before: every (latent, example) ablation and every clean pass ran the whole pLM from the embedding
(``splice_forward``; ``full_forwards`` below is that code).  Now: one clean pass per example keeps
the SAE layer's state, each ablation resumes from it above the SAE's layer, and UniRep stops after
the last read-out row.  Per SAE of the atlas: the examples ``plmscope analyze`` ablates (its
default one top example per live latent) for the first ``--latents`` live latents, both paths
timed on them (the faster of ``--repeats`` interleaved rounds), their effects compared.  Times are
the process's CPU seconds (one torch thread): on a machine shared with other CPU-bound work they
vary far less than wall seconds, which are printed too.

    python scripts/bench_output_effects.py --atlas var/demo/atlas.duckdb --latents 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import matmul_gflops  # noqa: E402


@torch.no_grad()
def full_forwards(plm, sae, examples, settings):
    """The step before it resumed from layer states (output_effect.py at 5fe1f7f): returns {latent: effect}."""
    from plmscope.causal.effects import aa_classes
    from plmscope.causal.intervene import Edit, Intervention, make_splice
    from plmscope.causal.output_effect import readout
    from plmscope.plm.base import token_batches

    classes = aa_classes(plm)
    clean = {}
    uniq = {e.key: e.sequence for e in examples}
    for batch in token_batches(list(uniq.items()), settings.token_budget):
        for (key, _), out in zip(batch, plm.splice_forward([s for _, s in batch], sae.layer)):
            clean[key] = out.logprobs[:, classes]
    sums, counts = {}, {}
    items = [(str(i), e.sequence) for i, e in enumerate(examples)]
    for batch in token_batches(items, settings.token_budget):
        ex = [examples[int(i)] for i, _ in batch]
        ivs = [Intervention((Edit(e.latent, "ablate"),)) for e in ex]
        outs = plm.splice_forward([e.sequence for e in ex], sae.layer, make_splice(sae, ivs, [len(e.sequence) for e in ex]))
        for e, out in zip(ex, outs):
            rows = torch.as_tensor(readout(plm.family, e.active, len(e.sequence)), dtype=torch.long)
            if len(rows):
                sums[e.latent] = sums.get(e.latent, 0.0) + (clean[e.key][rows] - out.logprobs[:, classes][rows]).double().sum(0).numpy()
                counts[e.latent] = counts.get(e.latent, 0) + len(rows)
    return {k: sums[k] / counts[k] for k in sums}


def examples_of(con, sae_id: str, per_latent: int, n_latents: int, max_residues: int):
    """The examples analyze ablates (analysis/output_effects.py) for the first ``n_latents`` live latents."""
    from plmscope.causal.output_effect import make_example
    from plmscope.store import analysis_reads as reads
    from plmscope.store.reader import decode_activations

    max_act = dict(con.execute("SELECT latent, max_act FROM latents WHERE sae_id = ? AND NOT is_dead AND max_act > 0",
                               [sae_id]).fetchall())
    chosen = sorted(max_act)[:n_latents]
    out = []
    for latent, acc, seq, blob in reads.top_example_proteins(con, sae_id, per_latent):
        if latent in chosen:
            ex = make_example(latent, acc, seq, np.asarray(decode_activations(blob, float(max_act[latent]))), max_residues)
            if ex is not None:
                out.append(ex)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atlas", default="var/demo/atlas.duckdb", help="read only")
    p.add_argument("--latents", type=int, default=64)
    p.add_argument("--examples", type=int, default=1, help="top examples per latent (analyze's default)")
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--sae", nargs="*", help="SAE ids (default: every SAE of the atlas)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    import duckdb

    from plmscope.causal.output_effect import OutputEffectSettings, output_effects
    from plmscope.plm import load_plm
    from plmscope.sae.io import sae_from_bytes
    from plmscope.store.reader import read_sae_weights

    con = duckdb.connect(a.atlas, read_only=True)
    saes = con.execute("SELECT sae_id, plm, layer FROM saes ORDER BY plm, layer").fetchall()
    saes = [s for s in saes if not a.sae or s[0] in a.sae]
    settings = OutputEffectSettings(examples=a.examples, token_budget=a.token_budget)
    print(f"machine: torch fp32 matmul {matmul_gflops(a.device)['gflops']:.0f} GFLOP/s, torch threads {torch.get_num_threads()}")
    plms, ratios, before_total, after_total = {}, [], 0.0, 0.0
    for sae_id, plm_name, layer in saes:
        plm = plms.get(plm_name) or plms.setdefault(plm_name, load_plm(plm_name, device=a.device))
        cfg, weights = read_sae_weights(con, sae_id, a.atlas)
        sae = sae_from_bytes(cfg, weights).to(plm.device).eval()
        examples = examples_of(con, sae_id, a.examples, a.latents, settings.max_residues)
        output_effects(plm, sae, examples[:2], settings)  # warm-up (scripting, allocations)
        best = {k: float("inf") for k in ("before", "after", "before_wall", "after_wall")}
        for _ in range(a.repeats):
            for name, run in (("before", lambda: full_forwards(plm, sae, examples, settings)),
                              ("after", lambda: output_effects(plm, sae, examples, settings))):
                t, w = time.process_time(), time.perf_counter()
                result = run()
                best[name] = min(best[name], time.process_time() - t)
                best[name + "_wall"] = min(best[name + "_wall"], time.perf_counter() - w)
                if name == "before":
                    old = result
                else:
                    new = result
        diff = max(float(np.abs(new.effect[i] - old[int(k)]).max()) for i, k in enumerate(new.latents))
        assert sorted(old) == new.latents.tolist(), "the two paths read out different latents"
        ratio = best["before"] / best["after"]
        ratios.append(ratio)
        before_total += best["before"]
        after_total += best["after"]
        print(f"{sae_id} (layer {layer} of {plm.num_layers}): {len(examples)} examples of {len(new.latents)} latents, "
              f"{len({e.key for e in examples})} proteins; CPU before {best['before']:.2f} s, after {best['after']:.2f} s: "
              f"{ratio:.2f}x (wall {best['before_wall']:.2f} -> {best['after_wall']:.2f} s); "
              f"max |effect difference| {diff:.1e}")
    if ratios:
        print(f"mean ratio over {len(ratios)} SAEs {np.mean(ratios):.2f}x; total CPU {before_total:.1f} s -> {after_total:.1f} s "
              f"({before_total / after_total:.2f}x)")


if __name__ == "__main__":
    main()
