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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..plm.base import load_plm
from ..provenance import sha256_file
from ..sequences import read_proteins
from .io import load_sae, read_cfg, sae_id, update_cfg

DENSE_THRESHOLD = 0.10  # a latent firing on > 10% of residues is "dense" (not a sparse feature)
EVAL_FILENAME = "eval.json"


@dataclass(frozen=True)
class EvalSettings:
    sae: Path
    fasta: Path
    max_proteins: int | None = None
    device: str = "auto"
    seed: int = 0  # of the ESM-2 masking
    token_budget: int = 8192

    def __post_init__(self) -> None:
        object.__setattr__(self, "sae", Path(self.sae))
        object.__setattr__(self, "fasta", Path(self.fasta))
        for name in ("max_proteins", "token_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalSettings":
        return cls(sae=args.sae, fasta=args.fasta, max_proteins=args.max_proteins, device=args.device,
                   seed=args.seed, token_budget=args.token_budget)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE directory (cfg.json + sae_weights.safetensors)")
    p.add_argument("--fasta", required=True, help="evaluation corpus: FASTA, TSV/CSV or UniProt .dat")
    p.add_argument("--max-proteins", type=int, default=None, help="use only the first N records")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of the ESM-2 masking")
    p.add_argument("--token-budget", type=int, default=8192, help="padded tokens per pLM forward batch")


def run(args: argparse.Namespace) -> int:
    settings = EvalSettings.from_args(args)
    result = _json_safe(evaluate(settings))
    text = json.dumps(result, indent=1)
    (settings.sae / EVAL_FILENAME).write_text(text + "\n")
    update_cfg(settings.sae, "metrics", result)
    print(text)
    return 0


@torch.no_grad()
def evaluate(s: EvalSettings) -> dict[str, Any]:
    """The SAE's metrics on the corpus ``s.fasta`` (see the module docstring)."""
    cfg = read_cfg(s.sae)
    corpus = read_proteins(s.fasta, strict=True, limit=s.max_proteins)
    plm = load_plm(cfg["plmscope"]["plm"], device=s.device)
    layer = int(cfg["plmscope"]["layer"])
    plm.check_layer(layer)
    sae = load_sae(s.sae, plm=plm.name, layer=layer, d_in=plm.d_model(layer), device=plm.device)
    items = [(p.accession, p.sequence) for p in corpus.proteins]
    rec = Reconstruction.measure(plm, sae, layer, items, s.token_budget)
    return {
        "sae": sae_id(cfg), "plm": plm.name, "layer": layer, "architecture": sae.architecture,
        "d_sae": sae.d_sae, "k": sae.k,
        "corpus": {"path": str(s.fasta.resolve()), "sha256": sha256_file(s.fasta),
                   "n_proteins": len(items), "n_residues": rec.n},
        **rec.metrics(),
        **lm_loss_metrics(plm, sae, layer, [seq for _, seq in items], s.seed),
    }


@dataclass
class Reconstruction:
    """Sums over every residue of the corpus (raw pLM space, float64) from which the
    reconstruction metrics follow."""

    d_in: int
    d_sae: int
    n: int = 0
    sse: float = 0.0
    sum_x2: float = 0.0
    active: int = 0
    sum_x: torch.Tensor = field(init=False)
    fires: torch.Tensor = field(init=False)  # per latent: residues it fired on

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.long)

    @classmethod
    def measure(cls, plm, sae, layer: int, items: list[tuple[str, str]], token_budget: int) -> "Reconstruction":
        rec = cls(sae.d_in, sae.d_sae)
        for _, _, rep in plm.iter_representations(items, layer, token_budget=token_budget):
            x = rep.to(sae.device, torch.float32)
            x_hat, z = sae(x)
            rec.add(x, x_hat, z)
        return rec

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x64 = x.double().cpu()
        self.sse += float((x_hat.double().cpu() - x64).pow(2).sum())
        self.sum_x += x64.sum(0)
        self.sum_x2 += float(x64.pow(2).sum())
        fired = (z > 0).cpu()
        self.active += int(fired.sum())
        self.fires += fired.sum(0)
        self.n += x.shape[0]

    def metrics(self) -> dict[str, float]:
        n, d = self.n, self.d_in
        sst = self.sum_x2 - float(self.sum_x.pow(2).sum()) / n  # sum ||x - mean||^2
        freq = self.fires.double() / n
        return {
            "explained_variance": 1.0 - self.sse / sst if sst > 0 else float("nan"),
            "mse": self.sse / (n * d),
            "l0": self.active / n,
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
            "dense_threshold": DENSE_THRESHOLD,
        }


def lm_loss_metrics(plm, sae, layer: int, seqs: list[str], seed: int) -> dict[str, Any]:
    """The pLM's loss with layer ``layer`` clean, spliced with the SAE's reconstruction and
    zero-ablated, and the share of the zero-ablation gap the SAE recovers."""

    def splice_sae(h: torch.Tensor) -> torch.Tensor:
        return sae(h.to(sae.device, torch.float32))[0].to(h.device, h.dtype)

    clean = plm.lm_loss(seqs, layer, None, seed=seed)
    spliced = plm.lm_loss(seqs, layer, splice_sae, seed=seed)
    zero = plm.lm_loss(seqs, layer, torch.zeros_like, seed=seed)
    gap = zero.mean - clean.mean
    objective = (
        f"masked-token cross-entropy, 15% of residues masked (seed {seed})"
        if plm.family == "esm2"
        else "next-amino-acid cross-entropy"
    )
    return {
        "lm_loss": {"objective": objective, "clean": clean.mean, "spliced": spliced.mean, "zero_ablated": zero.mean,
                    "n_tokens": clean.n_tokens},
        "loss_recovered_pct": (zero.mean - spliced.mean) / gap * 100 if abs(gap) > 1e-12 else float("nan"),
    }


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON; write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj
