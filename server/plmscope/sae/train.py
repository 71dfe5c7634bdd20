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

Several SAEs (``--layer``, ``--latents``, ``--k`` with several values: every combination) train
from one pLM pass: the shuffle buffer holds the layers side by side and every SAE steps on the same
residues, so each ends exactly as if it had been trained alone (tests check it).

The pLM's context-free positions (``ProteinLM.context_free_positions``: UniRep's residue 1) never
enter the buffer.

Checkpoints (``OUT/checkpoint/state.pt``, written under a temporary name and renamed: a kill at any
moment leaves the previous one or the new one) hold every SAE and its optimiser, the shuffle buffer,
the generator state, the stream position and the layer-mean sums, so ``--resume``
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
from ..plm.base import DTYPES, ProteinLM, load_plm, resolve_device
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
    dtype: str = "auto"  # pLM precision (plm.base.DTYPES)
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
    def grid_from_args(cls, args: argparse.Namespace) -> tuple["TrainSettings", ...]:
        """One settings per (layer, latents, k) of the command line, in that order.  A single SAE is
        written to ``--out``; several to ``--out/<run_name>`` each (and share one pLM pass)."""
        common = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in GRID_FIELDS + ("out",)}
        combos = [(layer, n, k) for layer in args.layer for n in args.latents for k in args.k]
        combos += [_spec(text) for text in getattr(args, "also", None) or []]
        if len(set(combos)) != len(combos):
            raise SAEError("--layer, --latents and --k repeat a setting")
        if len(combos) == 1:
            layer, n, k = combos[0]
            return (cls(layer=layer, latents=n, k=k, out=args.out, **common),)
        return tuple(cls(layer=layer, latents=n, k=k, out=Path(args.out) / run_name(common["arch"], layer, n, k),
                         **common) for layer, n, k in combos)

    def step_budget(self, n_residues: int) -> int:
        """SAE steps to train: ``--steps``, or ``--epochs`` x (corpus residues) / ``--batch-size``
        (the stream cycles the corpus, a fresh seeded order each pass, so both are a step budget)."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else 1.0
        return max(math.ceil(epochs * n_residues / self.batch_size), 1)


D = {f.name: f.default for f in fields(TrainSettings)}
GRID_FIELDS = ("layer", "latents", "k")  # what the SAEs of one train-sae run may differ in


def _spec(text: str) -> tuple[int, int, int]:
    try:
        layer, n, k = (int(x) for x in text.split(":"))
    except ValueError:
        raise SAEError(f"--also {text!r}: expected LAYER:LATENTS:K, e.g. 3:1024:16") from None
    return layer, n, k


def run_name(arch: str, layer: int, latents: int, k: int) -> str:
    """The directory of one SAE of a train-sae run with several settings."""
    return f"L{layer}-{arch}{latents}" + (f"-k{k}" if arch == "topk" else "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pLM: esm2_t6_8M_UR50D ..., a fair-esm .pt checkpoint, unirep-64/256/1900")
    p.add_argument("--layer", type=int, nargs="+", required=True,
                   help="representation layer (0 = embeddings); several: one SAE per layer from one pLM pass")
    p.add_argument("--fasta", required=True, help="training corpus: FASTA, TSV/CSV (accession, sequence) or UniProt .dat")
    p.add_argument("--out", required=True,
                   help="output SAE directory (SAELens layout); with several SAEs, the directory that holds "
                        "one per setting (L{layer}-{arch}{latents}-k{k}) and the shared checkpoint")
    p.add_argument("--arch", choices=["topk", "relu"], default=D["arch"])
    p.add_argument("--latents", type=int, nargs="+", default=[D["latents"]],
                   help="number of SAE latents (d_sae); several: one SAE per value")
    p.add_argument("--k", type=int, nargs="+", default=[D["k"]], help="active latents per residue (topk); several: one SAE per value")
    p.add_argument("--also", action="append", default=[], metavar="LAYER:LATENTS:K",
                   help="one more SAE with these settings, trained in the same pass (repeatable; e.g. a sweep "
                        "at one layer beside one setting at every layer)")
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
    p.add_argument("--dtype", choices=DTYPES, default=D["dtype"], help="pLM precision: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 (CUDA, or CPUs with native bf16: avx512_bf16/amx), fp16 (CUDA)")
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
    runs = TrainSettings.grid_from_args(args)
    train_many(runs, Path(args.out))
    return 0


def train(s: TrainSettings) -> Path:
    """Train (or, with ``resume``, continue) the SAE and save it to ``s.out``; returns ``s.out``."""
    return train_many((s,), s.out)[0]


def train_many(runs: tuple[TrainSettings, ...], root: Path) -> list[Path]:
    """Train the SAEs ``runs`` (same corpus, model and stream settings; any layers and sizes) from
    one pLM pass, the checkpoint in ``root``; returns their directories."""
    t0 = time.time()
    s = check_grid(runs)
    data = TrainingData.load(s, sorted({r.layer for r in runs}))
    records = [training_record(r, data) for r in runs]
    ckpt = load_checkpoint(root) if s.resume else None
    feed = Feed(s, data)
    trainers = [Trainer(r, data, rec, feed.columns[r.layer]) for r, rec in zip(runs, records)]
    if ckpt is not None:
        check_resumable(root, ckpt, records)
        feed.restore(ckpt["feed"])
        for trainer, state in zip(trainers, ckpt["saes"]):
            trainer.restore(state)
        log.info("resuming %s at step %d (epoch %d)", root, trainers[0].step, feed.pos.epoch)
    shown = _train_loop(s, feed, trainers, data, s.step_budget(data.n_residues), root)
    save_checkpoint(root, checkpoint(feed, trainers))  # the final state: --resume --steps N can train further
    wall = time.time() - t0
    for r, trainer, sh in zip(runs, trainers, shown):
        _save_sae(r, trainer, feed, data, sh, wall_s=wall)
    return [r.out for r in runs]


def check_grid(runs: tuple[TrainSettings, ...]) -> TrainSettings:
    """The first run's settings, after checking that the runs differ only in GRID_FIELDS and out."""
    first = runs[0]
    for r in runs[1:]:
        diff = [f.name for f in fields(TrainSettings)
                if f.name not in GRID_FIELDS + ("out",) and getattr(r, f.name) != getattr(first, f.name)]
        if diff:
            raise SAEError(f"SAEs trained together must share every setting but layer, latents, k and out; "
                           f"they differ in {', '.join(diff)}")
    return first


@dataclass
class TrainingData:
    """The pLM and the (clean) corpus it reads."""

    plm: ProteinLM
    device: torch.device
    d_in: dict[int, int]  # layer -> width
    items: list[tuple[str, str]]  # (accession, sequence)
    n_residues: int  # residues the SAEs train on (at most the pLM's limit per protein, less its context-free ones)
    corpus_sha: str
    residue_counts: dict[str, int]  # letter -> occurrences in the residues the pLM sees

    @classmethod
    def load(cls, s: TrainSettings, layers: list[int]) -> "TrainingData":
        corpus = read_proteins(s.fasta, strict=True, limit=s.max_proteins)
        corpus_sha = sha256_file(s.fasta)
        device = resolve_device(s.device)
        plm = load_plm(s.model, device=s.device, dtype=s.dtype)
        for layer in layers:
            plm.check_layer(layer)
        items = [(p.accession, p.sequence) for p in corpus.proteins]
        seen = [seq[: plm.max_residues] if plm.max_residues else seq for _, seq in items]
        n_residues = sum(max(len(seq) - plm.context_free_positions, 0) for seq in seen)
        counts = Counter(ch for seq in seen for ch in seq)
        return cls(plm, device, {layer: plm.d_model(layer) for layer in layers}, items, n_residues, corpus_sha,
                   dict(sorted(counts.items())))


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
        "aux_k": (s.aux_k or default_aux_k(data.d_in[s.layer])) if topk else None,
        "aux_coeff": s.aux_coeff,
        "dead_tokens": s.dead_tokens if s.dead_tokens is not None else dead_tokens_for(data.n_residues, s.batch_size),
        "l1_coeff": s.l1_coeff if s.arch == "relu" else None,
        "lr": s.lr, "batch_size": s.batch_size, "buffer_size": s.buffer_size,
        "token_budget": s.token_budget, "seed": s.seed, "corpus_sha256": data.corpus_sha,
        "optimizer": "Adam", "max_proteins": s.max_proteins,
        "context_free_positions": data.plm.context_free_positions,
    }


def check_resumable(out: Path, ckpt: dict[str, Any], records: list[dict[str, Any]]) -> None:
    if "feed" not in ckpt:
        raise SAEError(f"{out}: the checkpoint was written by an older plmscope; train again without --resume")
    before = ckpt["settings"]
    if len(before) != len(records):
        raise SAEError(f"{out}: cannot resume, the checkpoint holds {len(before)} SAE(s), this run trains {len(records)}")
    for b, now in zip(before, records):
        diff = {k: (b.get(k), now.get(k)) for k in RESUME_KEYS if b.get(k) != now.get(k)}
        if diff:
            shown = "; ".join(f"{k}: checkpoint {x!r} vs now {y!r}" for k, (x, y) in diff.items())
            raise SAEError(f"{out}: cannot resume, the checkpoint was made with other settings ({shown})")


class Feed:
    """The residue stream all SAEs of a run share: the shuffle buffer (the layers side by side) and
    its generator, batches drawn but not yet used, the stream position and the layer-mean sums."""

    def __init__(self, s: TrainSettings, data: TrainingData) -> None:
        self.layers = tuple(sorted(data.d_in))
        self.columns, at = {}, 0
        for layer in self.layers:
            self.columns[layer] = slice(at, at + data.d_in[layer])
            at += data.d_in[layer]
        self.width = at
        self.gen = torch.Generator().manual_seed(s.seed + 1)
        self.buffer = ShuffleBuffer(s.buffer_size, self.width, s.batch_size, self.gen)
        self.batch_size = s.batch_size
        self.pos, self.pending = Position(), []
        # Sum / residues / proteins of the layers over the stream's first pass (-> baselines.layer_mean).
        self.layer_sum = torch.zeros(self.width, dtype=torch.float64)
        self.layer_n, self.layer_proteins = 0, 0

    def push(self, stream: Iterator[tuple[Position, torch.Tensor]]) -> None:
        """Push the next protein into the buffer."""
        first_pass = self.pos.epoch == 0  # self.pos is the position of the protein about to come
        self.pos, rep = next(stream)
        if first_pass:
            self.layer_sum += rep.double().sum(0)
            self.layer_n += rep.shape[0]
            self.layer_proteins += 1
        self.pending = self.buffer.push(rep)

    def state(self) -> dict[str, Any]:
        rest = torch.cat(self.pending) if self.pending else torch.empty(0, self.width)
        return {"generator": self.gen.get_state(), "buffer": self.buffer.data[: self.buffer.n].clone(),
                "buffer_n": self.buffer.n, "pending": rest, "position": vars(self.pos).copy(),
                "layer_sum": self.layer_sum.clone(), "layer_n": self.layer_n, "layer_proteins": self.layer_proteins}

    def restore(self, st: dict[str, Any]) -> None:
        self.gen.set_state(st["generator"])
        self.buffer.n = int(st["buffer_n"])
        self.buffer.data[: self.buffer.n] = st["buffer"]
        self.pending = list(st["pending"].split(self.batch_size)) if st["pending"].numel() else []
        self.pos = Position(**st["position"])
        self.layer_sum = st["layer_sum"].double()
        self.layer_n, self.layer_proteins = int(st["layer_n"]), int(st["layer_proteins"])


class Trainer:
    """One SAE in training and its part of a checkpoint: the SAE, its optimiser, firing counts and
    counters; it reads columns ``cols`` (its layer) of the shared feed's batches."""

    def __init__(self, s: TrainSettings, data: TrainingData, record: dict[str, Any], cols: slice) -> None:
        self.record, self.device, self.cols = record, data.device, cols
        self.d_in = data.d_in[s.layer]
        training = {k: v for k, v in record.items() if k not in ("model", "layer", "corpus_sha256")}
        cfg = make_cfg(plm=data.plm.name, layer=s.layer, d_in=self.d_in, d_sae=s.latents, architecture=s.arch,
                       k=s.k if s.arch == "topk" else None, training=training)
        self.sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(s.seed)).to(data.device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=s.lr)
        self.fired = torch.zeros(s.latents, dtype=torch.long)  # per-latent firing counts -> sparsity.safetensors
        self.step, self.tokens, self.normalized = 0, 0, False

    def restore(self, st: dict[str, Any]) -> None:
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["optimizer"])
        self.fired = st["fired"]
        self.step, self.tokens, self.normalized = int(st["step"]), int(st["tokens"]), bool(st["normalized"])

    def state(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "optimizer": self.opt.state_dict(), "fired": self.fired,
                "step": self.step, "tokens": self.tokens, "normalized": self.normalized}

    def normalize_from(self, feed: Feed) -> None:
        """The normalisation, from the first batches drawn and what stays in the buffer."""
        sample = torch.cat(feed.pending + [feed.buffer.data[: feed.buffer.n]])[:, self.cols]
        mean = sample.mean(0)
        scale = float((sample - mean).pow(2).sum(-1).mean().div(self.d_in).sqrt())
        self.sae.set_normalization(mean, scale if scale > 0 else 1.0)
        self.normalized = True

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        """One SAE step on its columns of ``batch``; returns the step's statistics (``_step_stats``)."""
        x = batch[:, self.cols].to(self.device)
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


def checkpoint(feed: Feed, trainers: list[Trainer]) -> dict[str, Any]:
    return {"settings": [t.record for t in trainers], "feed": feed.state(), "saes": [t.state() for t in trainers]}


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


def _train_loop(s: TrainSettings, feed: Feed, trainers: list[Trainer], data: TrainingData, max_steps: int,
                root: Path) -> list[dict[str, float]]:
    """Steps until ``max_steps``, checkpointing every ``s.checkpoint_every``; returns each SAE's step
    statistics, exponentially smoothed (the progress bar shows the first SAE's)."""
    stream = iter_proteins_from(data.plm, data.items, feed.layers, s.seed, s.token_budget, feed.pos)
    step = trainers[0].step
    last_ckpt = step
    shown: list[dict[str, float]] = [{} for _ in trainers]
    layers = ",".join(str(x) for x in feed.layers)
    what = f"L{layers}" + (f" ({len(trainers)} SAEs)" if len(trainers) > 1 else "")
    bar = tqdm(total=max_steps, initial=step, desc=f"train-sae {data.plm.name} {what}", unit="step", mininterval=1.0)
    for t in trainers:
        t.sae.train()
    while step < max_steps:
        if not feed.pending:
            feed.push(stream)
            continue
        if not trainers[0].normalized:
            for t in trainers:
                t.normalize_from(feed)
        batch = feed.pending.pop(0)
        for t, sh in zip(trainers, shown):
            for key, value in t.train_step(batch).items():
                sh[key] = value if key not in sh else 0.95 * sh[key] + 0.05 * value
        step = trainers[0].step
        bar.update(1)
        if step % 10 == 0 or step == max_steps:
            bar.set_postfix({key: f"{v:.3g}" for key, v in shown[0].items()})
        if s.checkpoint_every and step - last_ckpt >= s.checkpoint_every and step < max_steps:
            save_checkpoint(root, checkpoint(feed, trainers))
            last_ckpt = step
    bar.close()
    return shown


def _save_sae(s: TrainSettings, trainer: Trainer, feed: Feed, data: TrainingData, shown: dict[str, float],
              wall_s: float) -> None:
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
        "trained_with_layers": list(feed.layers),  # one pLM pass fed the SAEs of these layers
        "final": {key: round(v, 5) for key, v in shown.items()},
    })
    sae.cfg["plmscope"]["baselines"] = training_baselines(trainer, feed, data)
    save_sae(sae.cpu(), s.out, sparsity=sparsity)
    log.info("saved SAE to %s (%d steps, %d residue vectors)", s.out, trainer.step, trainer.tokens)


def training_baselines(trainer: Trainer, feed: Feed, data: TrainingData) -> dict[str, Any]:
    """What eval-sae's mean-ablation and amino-acid-frequency baselines need (module docstring)."""
    out: dict[str, Any] = {
        "residue_counts": data.residue_counts,
        "residue_counts_n_residues": sum(data.residue_counts.values()),
    }
    if feed.layer_n == 0:
        out["layer_mean"] = None
        out["layer_mean_missing_reason"] = "training stopped before any protein was read"
        return out
    whole = feed.layer_proteins >= len(data.items) or feed.pos.epoch > 0
    out.update({
        "layer_mean": (feed.layer_sum[trainer.cols] / feed.layer_n).tolist(),  # float64, as summed
        "layer_mean_n_residues": feed.layer_n,
        "layer_mean_n_proteins": feed.layer_proteins,
        "layer_mean_whole_corpus": bool(whole),
        "layer_mean_context_free_positions_left_out": data.plm.context_free_positions,
    })
    return out
