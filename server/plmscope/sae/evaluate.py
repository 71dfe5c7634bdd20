"""Measure an SAE: reconstruction quality and its effect on the pLM's own loss.

Prints one JSON object and writes it to ``DIR/eval.json`` and into ``DIR/cfg.json`` under
``plmscope.metrics``.  Metrics over the residues of the evaluation corpus (raw pLM space):

* ``explained_variance`` = 1 - SSE / SST (SST around the evaluation corpus' per-dimension mean);
* ``mse``: squared error per residue and dimension; ``l0``: mean active latents per residue;
* ``dead_fraction``: latents that never fire on the corpus;
* ``dense_fraction``: latents firing on more than ``DENSE_THRESHOLD`` (10%) of residues;
* ``lm_loss``: the pLM's own objective with layer L's residue rows left alone (clean), replaced by
  the SAE reconstruction (spliced) or by zeros (zero-ablated), and
  ``loss_recovered_pct`` = (zero - spliced) / (zero - clean) * 100.  ESM-2: masked-token loss, 15% of
  residues masked with a fixed seed (the same positions for all three); UniRep: next-amino-acid loss.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..plm.base import load_plm
from ..sequences import read_proteins
from .io import load_sae, read_cfg, sae_id, update_cfg
from ..provenance import sha256_file

DENSE_THRESHOLD = 0.10  # a latent firing on > 10% of residues is "dense" (not a sparse feature)
EVAL_FILENAME = "eval.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE directory (cfg.json + sae_weights.safetensors)")
    p.add_argument("--fasta", required=True, help="evaluation corpus: FASTA, TSV/CSV or UniProt .dat")
    p.add_argument("--max-proteins", type=int, default=None, help="use only the first N records")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of the ESM-2 masking")
    p.add_argument("--token-budget", type=int, default=8192, help="padded tokens per pLM forward batch")


@torch.no_grad()
def evaluate(sae_dir: str | Path, fasta: str | Path, *, max_proteins: int | None = None, device: str = "auto",
             seed: int = 0, token_budget: int = 8192) -> dict[str, Any]:
    cfg = read_cfg(sae_dir)
    corpus = read_proteins(fasta, strict=True, limit=max_proteins)
    plm = load_plm(cfg["plmscope"]["plm"], device=device)
    layer = int(cfg["plmscope"]["layer"])
    plm.check_layer(layer)
    sae = load_sae(sae_dir, plm=plm.name, layer=layer, d_in=plm.d_model(layer), device=plm.device)

    d = sae.d_in
    n = 0
    sse = 0.0
    sum_x = torch.zeros(d, dtype=torch.float64)
    sum_x2 = 0.0
    active = 0
    fires = torch.zeros(sae.d_sae, dtype=torch.long)
    items = [(p.accession, p.sequence) for p in corpus.proteins]
    for _, _, rep in plm.iter_representations(items, layer, token_budget=token_budget):
        x = rep.to(sae.device, torch.float32)
        x_hat, z = sae(x)
        x64 = x.double().cpu()
        sse += float((x_hat.double().cpu() - x64).pow(2).sum())
        sum_x += x64.sum(0)
        sum_x2 += float(x64.pow(2).sum())
        fired = (z > 0).cpu()
        active += int(fired.sum())
        fires += fired.sum(0)
        n += x.shape[0]
    sst = sum_x2 - float(sum_x.pow(2).sum()) / n  # sum ||x - mean||^2
    freq = fires.double() / n

    def splice_sae(h: torch.Tensor) -> torch.Tensor:
        return sae(h.to(sae.device, torch.float32))[0].to(h.device, h.dtype)

    seqs = [s for _, s in items]
    clean = plm.lm_loss(seqs, layer, None, seed=seed)
    spliced = plm.lm_loss(seqs, layer, splice_sae, seed=seed)
    zero = plm.lm_loss(seqs, layer, torch.zeros_like, seed=seed)
    gap = zero.mean - clean.mean
    recovered = (zero.mean - spliced.mean) / gap * 100 if abs(gap) > 1e-12 else float("nan")
    objective = (
        f"masked-token cross-entropy, 15% of residues masked (seed {seed})"
        if plm.family == "esm2"
        else "next-amino-acid cross-entropy"
    )
    return {
        "sae": sae_id(cfg),
        "plm": plm.name,
        "layer": layer,
        "architecture": sae.architecture,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "corpus": {"path": str(Path(fasta).resolve()), "sha256": sha256_file(fasta),
                   "n_proteins": len(items), "n_residues": n},
        "explained_variance": 1.0 - sse / sst if sst > 0 else float("nan"),
        "mse": sse / (n * d),
        "l0": active / n,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
        "dense_threshold": DENSE_THRESHOLD,
        "lm_loss": {
            "objective": objective,
            "clean": clean.mean,
            "spliced": spliced.mean,
            "zero_ablated": zero.mean,
            "n_tokens": clean.n_tokens,
        },
        "loss_recovered_pct": recovered,
    }


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON; write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


def run(args: argparse.Namespace) -> int:
    result = _json_safe(evaluate(args.sae, args.fasta, max_proteins=args.max_proteins, device=args.device,
                                 seed=args.seed, token_budget=args.token_budget))
    text = json.dumps(result, indent=1)
    (Path(args.sae) / EVAL_FILENAME).write_text(text + "\n")
    update_cfg(args.sae, "metrics", result)
    print(text)
    return 0
