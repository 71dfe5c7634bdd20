"""Measure an SAE: reconstruction quality and its effect on the pLM's own loss.

Prints one JSON object and writes it to ``DIR/eval.json`` and into ``DIR/cfg.json`` under
``plmscope.metrics``.  Metrics over the residues of the evaluation corpus (raw pLM space):

* ``explained_variance`` = 1 - SSE / SST (SST around the evaluation corpus' per-dimension mean);
* ``mse``: squared error per residue and dimension; ``l0``: mean active latents per residue;
* ``dead_fraction``: latents that never fire on the corpus;
* ``dense_fraction``: latents firing on more than ``DENSE_THRESHOLD`` (10%) of residues.

The pLM's own objective (``objective``; ESM-2: masked-LM, 15 % of each protein's residues masked
with a fixed seed, scored on the masked residues; UniRep: next-amino-acid, scored on every
residue), in nats per scored residue (``lm_loss``), with layer L's residue rows

* ``clean``: left alone;
* ``spliced``: replaced by the SAE's reconstruction;
* ``mean_ablated``: replaced, every row, by the layer's mean over the SAE's *training* corpus
  (``cfg plmscope.baselines.layer_mean``, stored by train-sae).  An SAE trained before that was
  stored has no such mean: its mean-ablation numbers are null and ``baselines.mean_ablation`` says
  why (``normalization.mean`` is not used instead: it is a mean of the first shuffle-buffer fill);
* ``zero_ablated``: replaced by zeros.  Kept for comparison only: zeros are far outside the layer's
  distribution, so this floor is lower than any model that ignores the layer, and a share of
  loss "recovered" against it overstates the SAE;

and ``unigram``: every scored residue predicted from the amino-acid frequencies of the SAE's
training corpus alone (``cfg plmscope.baselines.residue_counts``).  The classes are the pLM's own
output classes for residue letters (``ProteinLM.target_class``: UniRep pools B, J, X and Z into
its X class; ESM-2 has a token per letter and scores J as <unk>), with add-one (Laplace) smoothing
over those classes: p(c) = (n_c + 1) / (N + K), K = number of classes.

Headline (``headline``), each with a 95 % percentile-bootstrap interval over proteins
(``intervals``: proteins resampled with replacement, every loss a residue-weighted mean):

* ``loss_recovered_vs_mean_ablation_pct`` = (mean_ablated - spliced) / (mean_ablated - clean) * 100;
* ``splice_delta_nats`` = spliced - clean;
* ``splice_cost_pct_of_model_gain`` = (spliced - clean) / (unigram - clean) * 100: the splice's cost
  as a share of all the model predicts beyond amino-acid frequencies.

``zero_ablation.loss_recovered_vs_zero_ablation_pct`` = (zero - spliced) / (zero - clean) * 100
is the number earlier versions printed as "% loss recovered".  ``corpus.set`` names the set the
numbers come from (``--set``: e.g. "selection" while choosing a layer, "report" for quoted numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, ModelError
from ..plm.base import load_plm
from ..provenance import sha256_file
from ..sequences import read_proteins
from .io import load_sae, read_cfg, sae_id, update_cfg

log = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000
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
    set_name: str | None = None  # which set the corpus is (e.g. "selection", "report"); recorded only
    loss_token_budget: int | None = None  # tokens per batch of the loss passes; None: the model's default

    def __post_init__(self) -> None:
        object.__setattr__(self, "sae", Path(self.sae))
        object.__setattr__(self, "fasta", Path(self.fasta))
        for name in ("max_proteins", "token_budget", "loss_token_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalSettings":
        return cls(sae=args.sae, fasta=args.fasta, max_proteins=args.max_proteins, device=args.device,
                   seed=args.seed, token_budget=args.token_budget, set_name=args.set,
                   loss_token_budget=args.loss_token_budget)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, nargs="+", help="SAE directory (cfg.json + sae_weights.safetensors); "
                   "several: each evaluated, the passes they share run once, a JSON list printed")
    p.add_argument("--fasta", required=True, help="evaluation corpus: FASTA, TSV/CSV or UniProt .dat")
    p.add_argument("--max-proteins", type=int, default=None, help="use only the first N records")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of the ESM-2 masking")
    p.add_argument("--token-budget", type=int, default=8192, help="padded tokens per pLM forward batch")
    p.add_argument("--loss-token-budget", type=int, default=None,
                   help="padded tokens per batch of the loss passes (default: the model's; UniRep runs faster wider)")
    p.add_argument("--set", default=None, help="name of the set the corpus is, recorded with the numbers "
                   "(e.g. selection while choosing a layer, report for the numbers quoted)")


def run(args: argparse.Namespace) -> int:
    """One SAE: its eval JSON on stdout.  Several (``--sae A B ...``): a JSON list, the pLM loaded once
    and the passes SAEs share (clean; zero- and mean-ablation of a layer) run once."""
    dirs = args.sae if isinstance(args.sae, list) else [args.sae]
    shared = SharedPasses()
    results = []
    for d in dirs:
        settings = EvalSettings.from_args(argparse.Namespace(**{**vars(args), "sae": d}))
        result = _json_safe(evaluate(settings, shared))
        text = json.dumps(result, indent=1)
        (settings.sae / EVAL_FILENAME).write_text(text + "\n")
        update_cfg(settings.sae, "metrics", result)
        results.append(result)
        log.info("%s", summary(result))
    print(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    return 0


class SharedPasses:
    """What evaluating several SAEs on one corpus can share: the pLM, and the loss passes that do not
    depend on the SAE (clean; a layer zeroed or set to a given mean)."""

    def __init__(self) -> None:
        self.plms: dict[str, Any] = {}
        self.losses: dict[tuple, Any] = {}

    def plm(self, name: str, device: str):
        if name not in self.plms:
            self.plms[name] = load_plm(name, device=device)
        return self.plms[name]

    def loss(self, key: tuple, compute):
        if key not in self.losses:
            self.losses[key] = compute()
        return self.losses[key]


def summary(r: dict[str, Any]) -> str:
    """The headline in one sentence, for people reading the log."""
    def show(number: dict[str, Any], fmt: str) -> str:
        if number["value"] is None:
            return "n/a"
        lo, hi = number["ci95"]
        return f"{fmt % number['value']} [{fmt % lo}, {fmt % hi}]"

    h, c = r["headline"], r["corpus"]
    where = f"{c['set']} set" if c.get("set") else "evaluation corpus"
    text = (f"{r['sae']} on the {where} ({c['n_proteins']} proteins), {r['objective']['name']} loss: "
            f"{show(h['loss_recovered_vs_mean_ablation_pct'], '%.1f')} % recovered vs mean-ablation; splice costs "
            f"{show(h['splice_delta_nats'], '%.4f')} nats = {show(h['splice_cost_pct_of_model_gain'], '%.1f')} % of "
            f"the model's gain over amino-acid frequencies (95 % bootstrap intervals over proteins)")
    missing = [b["reason"] for b in r["baselines"].values() if not b["available"]]
    return text + ("; " + "; ".join(missing) if missing else "")


@torch.no_grad()
def evaluate(s: EvalSettings, shared: SharedPasses | None = None) -> dict[str, Any]:
    """The SAE's metrics on the corpus ``s.fasta`` (see the module docstring)."""
    shared = shared or SharedPasses()
    cfg = read_cfg(s.sae)
    corpus = read_proteins(s.fasta, strict=True, limit=s.max_proteins)
    plm = shared.plm(cfg["plmscope"]["plm"], s.device)
    layer = int(cfg["plmscope"]["layer"])
    plm.check_layer(layer)
    sae = load_sae(s.sae, plm=plm.name, layer=layer, d_in=plm.d_model(layer), device=plm.device)
    items = [(p.accession, p.sequence) for p in corpus.proteins]
    rec = Reconstruction.measure(plm, sae, layer, items, s.token_budget)
    fasta_sha = sha256_file(s.fasta)
    return {
        "sae": sae_id(cfg), "plm": plm.name, "layer": layer, "architecture": sae.architecture,
        "d_sae": sae.d_sae, "k": sae.k,
        "corpus": {"set": s.set_name, "path": str(s.fasta.resolve()), "sha256": fasta_sha,
                   "n_proteins": len(items), "n_residues": rec.n},
        **rec.metrics(),
        **lm_loss_metrics(plm, sae, layer, [seq for _, seq in items], s.seed, cfg, token_budget=s.loss_token_budget,
                          shared=shared, corpus_key=(fasta_sha, s.max_proteins)),
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
        cf = plm.context_free_positions  # not trained on, not measured (as BOS)
        for _, _, rep in plm.iter_representations(items, layer, token_budget=token_budget):
            x = rep[cf:].to(sae.device, torch.float32)
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


def objective(plm, seed: int, mask_prob: float = 0.15) -> dict[str, Any]:
    """The pLM's training objective as eval-sae scores it, named for people and for programs."""
    if plm.family == "esm2":
        return {"name": "masked-LM", "mask_fraction": mask_prob, "mask_seed": seed,
                "description": f"masked-LM cross-entropy: round({mask_prob:g} x length) residues of each protein "
                               f"(at least 1), drawn with seed {seed}, replaced by <mask> and scored"}
    return {"name": "next-amino-acid",
            "description": "next-amino-acid cross-entropy: the state before each residue predicts it; "
                           "every residue is scored"}


def training_mean(cfg: dict[str, Any]) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Layer L's training-corpus mean stored with the SAE, and what it is (or why it is missing)."""
    b = cfg["plmscope"].get("baselines") or {}
    if b.get("layer_mean") is None:
        reason = b.get("layer_mean_missing_reason") or (
            "this SAE's cfg.json has no plmscope.baselines.layer_mean (it was trained before train-sae stored "
            "the training mean of its layer); normalization.mean is a mean of the first shuffle-buffer fill "
            "only and is not used in its place. Retrain the SAE with this plmscope to get the baseline.")
        return None, {"available": False, "reason": reason}
    mean = torch.tensor(b["layer_mean"], dtype=torch.float32)
    if mean.shape != (int(cfg["d_in"]),):
        raise InputError(f"plmscope.baselines.layer_mean has {mean.numel()} values, the SAE's d_in is {cfg['d_in']}")
    return mean, {
        "available": True, "what": "every residue row of layer L set to the layer's mean over the SAE's training corpus",
        "source": "cfg.json plmscope.baselines.layer_mean", "n_residues": b.get("layer_mean_n_residues"),
        "n_proteins": b.get("layer_mean_n_proteins"), "whole_training_corpus": b.get("layer_mean_whole_corpus"),
    }


def unigram_log_probs(plm, cfg: dict[str, Any]) -> tuple[dict[int, float] | None, dict[str, Any]]:
    """log p(class) of the amino-acid-frequency baseline (module docstring), from the SAE's stored
    training-corpus residue counts."""
    counts = (cfg["plmscope"].get("baselines") or {}).get("residue_counts")
    if not counts:
        return None, {"available": False, "reason": (
            "this SAE's cfg.json has no plmscope.baselines.residue_counts (trained before train-sae stored "
            "the training corpus' amino-acid counts); retrain it with this plmscope to get the baseline")}
    per_class: dict[int, int] = {}
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        try:
            per_class.setdefault(plm.target_class(letter), 0)
        except ModelError:  # a letter the pLM cannot read at all is never a target
            continue
    for letter, n in counts.items():
        per_class[plm.target_class(letter)] += int(n)
    total, k = sum(per_class.values()), len(per_class)
    log_p = {c: math.log((n + 1) / (total + k)) for c, n in per_class.items()}
    return log_p, {
        "available": True, "what": "each scored residue predicted from the training corpus' amino-acid frequencies",
        "source": "cfg.json plmscope.baselines.residue_counts", "n_residues": total, "n_classes": k,
        "classes": "the pLM's output classes for residue letters", "smoothing": "add-one: (n_c + 1) / (N + K)",
    }


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(den) > 1e-12, np.asarray(num, dtype=float) / den * 100.0, np.nan)


def _derived(clean, spliced, mean_abl, zero, unigram) -> dict[str, Any]:
    """The headline numbers from mean losses (floats or arrays of bootstrap resamples)."""
    return {
        "loss_recovered_vs_mean_ablation_pct": _ratio(mean_abl - spliced, mean_abl - clean),
        "splice_delta_nats": np.asarray(spliced - clean, dtype=float),
        "splice_cost_pct_of_model_gain": _ratio(spliced - clean, unigram - clean),
        "loss_recovered_vs_zero_ablation_pct": _ratio(zero - spliced, zero - clean),
    }


def lm_loss_metrics(plm, sae, layer: int, seqs: list[str], seed: int, cfg: dict[str, Any] | None = None,
                    n_resamples: int = BOOTSTRAP_RESAMPLES, token_budget: int | None = None,
                    shared: SharedPasses | None = None, corpus_key: tuple = ()) -> dict[str, Any]:
    """The pLM's loss with layer ``layer`` clean, spliced, mean- and zero-ablated, the unigram
    baseline, and the headline numbers with bootstrap intervals (module docstring)."""
    cfg = cfg if cfg is not None else sae.cfg
    mean, mean_info = training_mean(cfg)
    log_p, uni_info = unigram_log_probs(plm, cfg)

    def splice_sae(h: torch.Tensor) -> torch.Tensor:
        return sae(h.to(sae.device, torch.float32))[0].to(h.device, h.dtype)

    def splice_mean(h: torch.Tensor) -> torch.Tensor:
        return mean.to(h.device, h.dtype).expand_as(h).clone()

    kw = {"token_budget": token_budget} if token_budget else {}  # batching changes no loss, only the speed
    shared = shared or SharedPasses()
    key = (plm.name, seed, corpus_key or tuple(seqs))

    def loss(splice):
        return lambda: plm.lm_loss(seqs, layer, splice, seed=seed, **kw)

    runs = {"clean": shared.loss(key + ("clean",), loss(None)),
            "spliced": plm.lm_loss(seqs, layer, splice_sae, seed=seed, **kw),
            "zero_ablated": shared.loss(key + ("zero", layer), loss(torch.zeros_like))}
    if mean is not None:
        runs["mean_ablated"] = shared.loss(key + ("mean", layer, mean.numpy().tobytes()), loss(splice_mean))
    tokens = np.array(runs["clean"].tokens_per_sequence, dtype=float)
    per_protein = {name: np.array(r.per_sequence, dtype=float) for name, r in runs.items()}
    if log_p is not None:
        scored = plm.scored_residues(seqs, seed=seed)
        if [len(r) for r in scored] != runs["clean"].tokens_per_sequence:
            raise ModelError(f"{plm.name}: scored_residues disagrees with lm_loss on which residues are scored")
        per_protein["unigram"] = np.array([-sum(log_p[plm.target_class(ch)] for ch in r) for r in scored])
    nan = np.full(len(seqs), np.nan)
    arrays = [per_protein.get(k, nan) for k in ("clean", "spliced", "mean_ablated", "zero_ablated", "unigram")]

    n_tok = tokens.sum()
    means = [float(a.sum() / n_tok) if n_tok else float("nan") for a in arrays]
    point = _derived(*[np.float64(m) for m in means])
    boot = _bootstrap(tokens, arrays, n_resamples, seed)

    def number(key: str) -> dict[str, Any]:
        lo, hi = (np.nanpercentile(boot[key], [2.5, 97.5]) if np.isfinite(boot[key]).any() else (np.nan, np.nan))
        return {"value": float(point[key]), "ci95": [float(lo), float(hi)]}

    clean, spliced, mean_abl, zero, unigram = means
    return {
        "objective": objective(plm, seed),
        "lm_loss": {"unit": "nats per scored residue", "clean": clean, "spliced": spliced, "mean_ablated": mean_abl,
                    "zero_ablated": zero, "unigram": unigram, "model_gain_over_unigram": unigram - clean,
                    "n_tokens": int(n_tok), "n_proteins": len(seqs)},
        "headline": {key: number(key) for key in
                     ("loss_recovered_vs_mean_ablation_pct", "splice_delta_nats", "splice_cost_pct_of_model_gain")},
        "zero_ablation": {
            "loss_recovered_vs_zero_ablation_pct": number("loss_recovered_vs_zero_ablation_pct"),
            "note": "floor = layer L set to zeros, far outside its distribution; not the headline",
        },
        "baselines": {"mean_ablation": mean_info, "unigram": uni_info},
        "intervals": {"method": "percentile bootstrap over proteins (residue-weighted means)", "level": 0.95,
                      "n_resamples": n_resamples, "seed": seed},
    }


def _bootstrap(tokens: np.ndarray, arrays: list[np.ndarray], n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """The derived numbers on ``n_resamples`` resamples of the proteins (with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(tokens)
    sums = [np.empty(n_resamples) for _ in arrays]
    tok = np.empty(n_resamples)
    chunk = max(1, min(n_resamples, 5_000_000 // max(n, 1)))  # bounded memory for large corpora
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n)) if n else np.zeros((0, 0), int)
        stop = start + idx.shape[0]
        tok[start:stop] = tokens[idx].sum(1)
        for out, a in zip(sums, arrays):
            out[start:stop] = a[idx].sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _derived(*[s / tok for s in sums])


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON; write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj
