"""Train a sparse autoencoder on one pLM layer's per-residue representations.

The corpus (FASTA, TSV/CSV or UniProt flat file; every record must be valid) is streamed through the
pLM in length-sorted token batches; residue vectors go through a bounded shuffle buffer (memory does
not grow with the corpus) and are drawn at random, with a seeded generator, into SAE batches.
Training uses Adam in normalised space (per-dimension mean, one scalar scale, both estimated from
the first buffer fill); the SAE is saved in the SAELens layout with the normalisation folded in.

``eval-sae``'s baselines need two statistics of the training corpus, stored with the SAE under
``cfg['plmscope']['baselines']`` (``training_baselines``):

* ``layer_mean``: the mean of layer L's residue vectors over the stream's first pass, i.e. over
  every residue of the training corpus once training has reached a second epoch (``--epochs 1``,
  the default, always has), else over the ``layer_mean_n_proteins`` proteins it reached.  It is
  summed in float64 as proteins enter the shuffle buffer.  It is *not* ``normalization.mean``,
  which comes from the first buffer fill only;
* ``residue_counts``: how often each letter occurs in the training corpus (as the pLM sees it,
  truncated to its limit), for the amino-acid-frequency (unigram) baseline.

Checkpoints (``DIR/checkpoint/state.pt``, written under a temporary name and renamed: a kill at any
moment leaves the previous one or the new one) hold the SAE,
the optimiser, the shuffle buffer, the generator state, the stream position and the layer-mean
sums, so ``--resume``
continues exactly where the checkpoint was taken: on CPU a resumed run ends bit-identical to an
uninterrupted one (the pLM batch being consumed is recomputed with the same composition).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from .. import atomic, faults
from ..errors import SAEError
from ..plm.base import ProteinLM, load_plm, resolve_device
from ..provenance import sha256_file
from ..sequences import read_proteins
from .io import save_sae
from .model import (DEFAULT_AUX_COEFF, DEFAULT_DEAD_TOKENS, DEFAULT_L1_COEFF, SparseAutoencoder, default_aux_k,
                    make_cfg)
from .residues import Position, ShuffleBuffer, iter_proteins_from

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
# settings that must match for --resume to continue a run (others, e.g. --steps, may change)
RESUME_KEYS = ("model", "layer", "arch", "latents", "k", "aux_k", "l1_coeff", "lr", "batch_size",
               "buffer_size", "token_budget", "seed", "corpus_sha256", "dead_tokens")


@dataclass(frozen=True)
class TrainSettings:
    """What ``train-sae`` is asked to do, checked once when made (``from_args`` for the command
    line); errors name the flag."""

    model: str
    layer: int
    fasta: Path
    out: Path
    arch: str = "topk"
    latents: int = 4096
    k: int = 32
    aux_k: int | None = None  # None: default_aux_k(d_in)
    aux_coeff: float = DEFAULT_AUX_COEFF
    dead_tokens: int | None = None  # None: from the corpus size (dead_tokens_for)
    l1_coeff: float = DEFAULT_L1_COEFF
    lr: float = 1e-3
    batch_size: int = 1024
    steps: int | None = None
    epochs: float | None = None  # None (and no steps): 1
    buffer_size: int = 32768
    token_budget: int = 8192
    checkpoint_every: int = 500
    resume: bool = False
    device: str = "auto"
    seed: int = 0
    max_proteins: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fasta", Path(self.fasta))
        object.__setattr__(self, "out", Path(self.out))
        if self.arch not in ("topk", "relu"):
            raise SAEError(f"--arch {self.arch!r}: expected topk or relu")
        for name in ("latents", "batch_size", "buffer_size", "token_budget", "dead_tokens", "steps", "max_proteins"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SAEError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.buffer_size < 2 * self.batch_size:
            raise SAEError(f"--buffer-size ({self.buffer_size}) must be at least twice --batch-size ({self.batch_size})")
        if self.arch == "topk" and not 1 <= self.k <= self.latents:
            raise SAEError(f"--k must be between 1 and --latents ({self.latents}), got {self.k}")
        if self.steps is not None and self.epochs is not None:
            raise SAEError("give --steps or --epochs, not both")
        if self.epochs is not None and self.epochs <= 0:
            raise SAEError(f"--epochs must be positive, got {self.epochs}")
        if self.checkpoint_every < 0:
            raise SAEError(f"--checkpoint-every must be 0 (only at the end) or more, got {self.checkpoint_every}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainSettings":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def step_budget(self, n_residues: int) -> int:
        """SAE steps to train: ``--steps``, or ``--epochs`` x (corpus residues) / ``--batch-size``
        (the stream cycles the corpus, a fresh seeded order each pass, so both are a step budget)."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else 1.0
        return max(math.ceil(epochs * n_residues / self.batch_size), 1)


D = {f.name: f.default for f in fields(TrainSettings)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pLM: esm2_t6_8M_UR50D ..., a fair-esm .pt checkpoint, unirep-64/256/1900")
    p.add_argument("--layer", type=int, required=True, help="representation layer (0 = embeddings)")
    p.add_argument("--fasta", required=True, help="training corpus: FASTA, TSV/CSV (accession, sequence) or UniProt .dat")
    p.add_argument("--out", required=True, help="output SAE directory (SAELens layout)")
    p.add_argument("--arch", choices=["topk", "relu"], default=D["arch"])
    p.add_argument("--latents", type=int, default=D["latents"], help="number of SAE latents (d_sae)")
    p.add_argument("--k", type=int, default=D["k"], help="active latents per residue (topk)")
    p.add_argument("--aux-k", type=int, default=None, help="dead latents in the AuxK loss (default d_in/2)")
    p.add_argument("--aux-coeff", type=float, default=D["aux_coeff"], help="AuxK loss coefficient (default 1/32)")
    p.add_argument("--dead-tokens", type=int, default=None,
                   help="a latent is dead (and enters the AuxK loss) when it has not fired for this many "
                        "residues (default: half the corpus' residues, at most 1,000,000)")
    p.add_argument("--l1-coeff", type=float, default=D["l1_coeff"], help="L1 coefficient (relu)")
    p.add_argument("--lr", type=float, default=D["lr"])
    p.add_argument("--batch-size", type=int, default=D["batch_size"], help="residue vectors per SAE step")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="stop after this many SAE steps (cycling the corpus)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the corpus (default 1)")
    p.add_argument("--buffer-size", type=int, default=D["buffer_size"], help="shuffle buffer capacity in residue vectors")
    p.add_argument("--token-budget", type=int, default=D["token_budget"], help="padded tokens per pLM forward batch")
    p.add_argument("--checkpoint-every", type=int, default=D["checkpoint_every"],
                   help="steps between checkpoints (0 = only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--device", default=D["device"], help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=D["seed"])
    p.add_argument("--max-proteins", type=int, default=None, help="use only the first N records")


# ---- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Write DIR/checkpoint/state.pt atomically (``atomic.writing``): a kill at any moment leaves
    the previous checkpoint or the new one."""
    final = out / CHECKPOINT_DIR
    final.mkdir(parents=True, exist_ok=True)
    path = final / CHECKPOINT_FILE
    atomic.remove_stale(path)
    with atomic.writing(path) as tmp:
        torch.save(state, tmp)
        faults.point("train:checkpoint-written")


def load_checkpoint(out: Path) -> dict[str, Any]:
    path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not path.is_file():
        # an older plmscope swapped whole checkpoint directories; one killed between its two
        # renames left the previous checkpoint only under this name
        older = sorted(out.glob(f".{CHECKPOINT_DIR}.old.*/{CHECKPOINT_FILE}"))
        path = older[-1] if older else path
    if not path.is_file():
        raise SAEError(f"{out}: --resume given but there is no checkpoint ({path} is missing)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle/zip
        raise SAEError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None


# ---- training ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    train(TrainSettings.from_args(args))
    return 0


def train(s: TrainSettings) -> Path:
    """Train (or, with ``resume``, continue) the SAE and save it to ``s.out``; returns ``s.out``."""
    t0 = time.time()
    data = TrainingData.load(s)
    record = training_record(s, data)
    ckpt = load_checkpoint(s.out) if s.resume else None
    if ckpt is not None:
        check_resumable(s.out, ckpt["settings"], record)
    trainer = Trainer(s, data, record)
    if ckpt is not None:
        trainer.restore(ckpt)
        log.info("resuming %s at step %d (epoch %d)", s.out, trainer.step, trainer.pos.epoch)
    shown = _train_loop(s, trainer, data, s.step_budget(data.n_residues))
    save_checkpoint(s.out, trainer.checkpoint())  # the final state, so that --resume --steps N can train further
    _save_sae(s, trainer, data, shown, wall_s=time.time() - t0)
    return s.out


@dataclass
class TrainingData:
    """The pLM and the (clean) corpus it reads."""

    plm: ProteinLM
    device: torch.device
    d_in: int
    items: list[tuple[str, str]]  # (accession, sequence)
    n_residues: int  # residues the pLM sees (at most its limit per protein)
    corpus_sha: str
    residue_counts: dict[str, int]  # letter -> occurrences in the residues the pLM sees

    @classmethod
    def load(cls, s: TrainSettings) -> "TrainingData":
        corpus = read_proteins(s.fasta, strict=True, limit=s.max_proteins)
        corpus_sha = sha256_file(s.fasta)
        device = resolve_device(s.device)
        plm = load_plm(s.model, device=s.device)
        plm.check_layer(s.layer)
        items = [(p.accession, p.sequence) for p in corpus.proteins]
        seen = [seq[: plm.max_residues] if plm.max_residues else seq for _, seq in items]
        n_residues = sum(len(seq) for seq in seen)
        counts = Counter(ch for seq in seen for ch in seq)
        return cls(plm, device, plm.d_model(s.layer), items, n_residues, corpus_sha, dict(sorted(counts.items())))


def dead_tokens_for(n_residues: int, batch_size: int) -> int:
    # Gao et al. use 10M tokens of runs with billions; scale to the corpus so that AuxK also acts
    # in short CPU runs, but never wait longer than DEFAULT_DEAD_TOKENS.
    return min(DEFAULT_DEAD_TOKENS, max(n_residues // 2, 10 * batch_size))


def training_record(s: TrainSettings, data: TrainingData) -> dict[str, Any]:
    """The training settings as stored in the checkpoint and the SAE's cfg, defaults resolved."""
    topk = s.arch == "topk"
    return {
        "model": s.model, "layer": s.layer, "arch": s.arch, "latents": s.latents,
        "k": s.k if topk else None,
        "aux_k": (s.aux_k or default_aux_k(data.d_in)) if topk else None,
        "aux_coeff": s.aux_coeff,
        "dead_tokens": s.dead_tokens if s.dead_tokens is not None else dead_tokens_for(data.n_residues, s.batch_size),
        "l1_coeff": s.l1_coeff if s.arch == "relu" else None,
        "lr": s.lr, "batch_size": s.batch_size, "buffer_size": s.buffer_size,
        "token_budget": s.token_budget, "seed": s.seed, "corpus_sha256": data.corpus_sha,
        "optimizer": "Adam", "max_proteins": s.max_proteins,
    }


def check_resumable(out: Path, before: dict[str, Any], now: dict[str, Any]) -> None:
    diff = {k: (before.get(k), now.get(k)) for k in RESUME_KEYS if before.get(k) != now.get(k)}
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise SAEError(f"{out}: cannot resume, the checkpoint was made with other settings ({shown})")


class Trainer:
    """The SAE in training and all that a checkpoint holds: optimiser, shuffle buffer and its
    generator, batches drawn but not yet used, firing counts, counters and the stream position."""

    def __init__(self, s: TrainSettings, data: TrainingData, record: dict[str, Any]) -> None:
        self.record, self.device, self.d_in, self.batch_size = record, data.device, data.d_in, s.batch_size
        training = {k: v for k, v in record.items() if k not in ("model", "layer", "corpus_sha256")}
        cfg = make_cfg(plm=data.plm.name, layer=s.layer, d_in=data.d_in, d_sae=s.latents, architecture=s.arch,
                       k=s.k if s.arch == "topk" else None, training=training)
        self.sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(s.seed)).to(data.device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=s.lr)
        self.gen = torch.Generator().manual_seed(s.seed + 1)
        self.buffer = ShuffleBuffer(s.buffer_size, data.d_in, s.batch_size, self.gen)
        self.fired = torch.zeros(s.latents, dtype=torch.long)  # per-latent firing counts -> sparsity.safetensors
        self.step, self.tokens, self.pos, self.pending, self.normalized = 0, 0, Position(), [], False
        # Sum / residues / proteins of layer L over the stream's first pass (-> baselines.layer_mean).
        # None after resuming a checkpoint written before these sums were kept: no exact mean then.
        self.layer_sum: torch.Tensor | None = torch.zeros(data.d_in, dtype=torch.float64)
        self.layer_n, self.layer_proteins = 0, 0

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.sae.load_state_dict(ckpt["sae"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.gen.set_state(ckpt["generator"])
        self.buffer.n = int(ckpt["buffer_n"])
        self.buffer.data[: self.buffer.n] = ckpt["buffer"]
        self.pending = list(ckpt["pending"].split(self.batch_size)) if ckpt["pending"].numel() else []
        self.fired = ckpt["fired"]
        self.step, self.tokens, self.pos = int(ckpt["step"]), int(ckpt["tokens"]), Position(**ckpt["position"])
        self.normalized = bool(ckpt["normalized"])
        if "layer_sum" in ckpt:
            self.layer_sum = ckpt["layer_sum"].double()
            self.layer_n, self.layer_proteins = int(ckpt["layer_n"]), int(ckpt["layer_proteins"])
        else:
            self.layer_sum = None

    def checkpoint(self) -> dict[str, Any]:
        rest = torch.cat(self.pending) if self.pending else torch.empty(0, self.d_in)
        return {
            "settings": self.record, "sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
            "generator": self.gen.get_state(), "buffer": self.buffer.data[: self.buffer.n].clone(),
            "buffer_n": self.buffer.n, "pending": rest, "fired": self.fired, "step": self.step,
            "tokens": self.tokens, "normalized": self.normalized, "position": vars(self.pos).copy(),
            **({"layer_sum": self.layer_sum.clone(), "layer_n": self.layer_n, "layer_proteins": self.layer_proteins}
               if self.layer_sum is not None else {}),
        }

    def feed(self, stream: Iterator[tuple[Position, torch.Tensor]]) -> None:
        """Push the next protein into the buffer; the first batches drawn also set the normalisation."""
        first_pass = self.pos.epoch == 0  # self.pos is the position of the protein about to come
        self.pos, rep = next(stream)
        if first_pass and self.layer_sum is not None:
            self.layer_sum += rep.double().sum(0)
            self.layer_n += rep.shape[0]
            self.layer_proteins += 1
        self.pending = self.buffer.push(rep)
        if self.pending and not self.normalized:
            sample = torch.cat(self.pending + [self.buffer.data[: self.buffer.n]])
            mean = sample.mean(0)
            scale = float((sample - mean).pow(2).sum(-1).mean().div(self.d_in).sqrt())
            self.sae.set_normalization(mean, scale if scale > 0 else 1.0)
            self.normalized = True

    def train_step(self) -> dict[str, float]:
        """One SAE step on the next pending batch; returns its statistics (``_step_stats``)."""
        x = self.pending.pop(0).to(self.device)
        xn = self.sae.normalize(x)
        res = self.sae.training_loss(xn)
        self.opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        self.sae.remove_parallel_grad_()  # keep decoder rows on the unit sphere (per latent)...
        self.opt.step()
        self.sae.normalize_decoder_()  # ...and remove the drift Adam still causes
        self.fired += (res["z"] > 0).sum(0).cpu()
        self.step += 1
        self.tokens += x.shape[0]
        return _step_stats(self.sae, xn, res)


def _step_stats(sae: SparseAutoencoder, xn: torch.Tensor, out: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        err = (out["x_hat"] - xn).pow(2).sum()
        var = (xn - xn.mean(0)).pow(2).sum().clamp_min(1e-12)
        return {
            "L0": float((out["z"] > 0).sum(-1).float().mean()),
            "MSE": float(out["mse"].detach()) / sae.d_in,  # per dimension, normalised space
            "EV": float(1 - err / var),
            "dead": float(sae.dead_mask().float().mean()),
        }


def _train_loop(s: TrainSettings, trainer: Trainer, data: TrainingData, max_steps: int) -> dict[str, float]:
    """Steps until ``max_steps``, checkpointing every ``s.checkpoint_every``; returns the step
    statistics, exponentially smoothed (as the progress bar shows them)."""
    stream = iter_proteins_from(data.plm, data.items, s.layer, s.seed, s.token_budget, trainer.pos)
    last_ckpt = trainer.step
    shown: dict[str, float] = {}
    bar = tqdm(total=max_steps, initial=trainer.step, desc=f"train-sae {data.plm.name} L{s.layer}", unit="step",
               mininterval=1.0)
    trainer.sae.train()
    while trainer.step < max_steps:
        if not trainer.pending:
            trainer.feed(stream)
            continue
        stats = trainer.train_step()
        step = trainer.step
        bar.update(1)
        for key, value in stats.items():
            shown[key] = value if key not in shown else 0.95 * shown[key] + 0.05 * value
        if step % 10 == 0 or step == max_steps:
            bar.set_postfix({key: f"{v:.3g}" for key, v in shown.items()})
        if s.checkpoint_every and step - last_ckpt >= s.checkpoint_every and step < max_steps:
            save_checkpoint(s.out, trainer.checkpoint())
            last_ckpt = step
    bar.close()
    return shown


def _save_sae(s: TrainSettings, trainer: Trainer, data: TrainingData, shown: dict[str, float], wall_s: float) -> None:
    """The SAE in the SAELens layout, with its corpus, training record and firing frequencies."""
    freq = trainer.fired.double() / max(trainer.tokens, 1)
    sparsity = torch.log10(freq + 1e-10).float()  # SAELens: log10 feature firing frequency
    sae = trainer.sae
    sae.cfg["plmscope"]["corpus"] = {
        "path": str(s.fasta.resolve()), "sha256": data.corpus_sha,
        "n_proteins": len(data.items), "n_residues": data.n_residues,
    }
    sae.cfg["plmscope"]["training"].update({
        "steps": trainer.step, "tokens": trainer.tokens, "device": str(data.device), "wall_s": round(wall_s, 1),
        "final": {key: round(v, 5) for key, v in shown.items()},
    })
    sae.cfg["plmscope"]["baselines"] = training_baselines(trainer, data)
    save_sae(sae.cpu(), s.out, sparsity=sparsity)
    log.info("saved SAE to %s (%d steps, %d residue vectors)", s.out, trainer.step, trainer.tokens)


def training_baselines(trainer: Trainer, data: TrainingData) -> dict[str, Any]:
    """What eval-sae's mean-ablation and amino-acid-frequency baselines need (module docstring)."""
    out: dict[str, Any] = {
        "residue_counts": data.residue_counts,
        "residue_counts_n_residues": data.n_residues,
    }
    if trainer.layer_sum is None or trainer.layer_n == 0:
        out["layer_mean"] = None
        out["layer_mean_missing_reason"] = ("resumed from a checkpoint written before plmscope kept the "
                                            "layer-mean sums")
        return out
    whole = trainer.layer_proteins >= len(data.items) or trainer.pos.epoch > 0
    out.update({
        "layer_mean": (trainer.layer_sum / trainer.layer_n).tolist(),  # float64, as summed
        "layer_mean_n_residues": trainer.layer_n,
        "layer_mean_n_proteins": trainer.layer_proteins,
        "layer_mean_whole_corpus": bool(whole),
    })
    return out
