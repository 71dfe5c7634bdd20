"""Train a sparse autoencoder on one pLM layer's per-residue representations.

The corpus (FASTA, TSV/CSV or UniProt flat file; every record must be valid) is streamed through the
pLM in length-sorted token batches; residue vectors go through a bounded shuffle buffer (memory does
not grow with the corpus) and are drawn at random, with a seeded generator, into SAE batches.
Training uses Adam in normalised space (per-dimension mean, one scalar scale, both estimated from
the first buffer fill); the SAE is saved in the SAELens layout with the normalisation folded in.

Checkpoints (``DIR/checkpoint/state.pt``, written to a temporary directory and renamed) hold the SAE,
the optimiser, the shuffle buffer, the generator state and the stream position, so ``--resume``
continues exactly where the checkpoint was taken: on CPU a resumed run ends bit-identical to an
uninterrupted one (the pLM batch being consumed is recomputed with the same composition).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from ..errors import SAEError
from ..plm.base import ProteinLM, load_plm, resolve_device, token_batches
from ..provenance import sha256_file
from ..sequences import read_proteins
from .io import save_sae
from .model import DEFAULT_AUX_COEFF, DEFAULT_DEAD_TOKENS, DEFAULT_L1_COEFF, SparseAutoencoder, make_cfg

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
SORT_WINDOW = 2048  # proteins per length-sorting window (as ProteinLM.iter_representations)
# settings that must match for --resume to continue a run (others, e.g. --steps, may change)
RESUME_KEYS = ("model", "layer", "arch", "latents", "k", "aux_k", "l1_coeff", "lr", "batch_size",
               "buffer_size", "token_budget", "seed", "corpus_sha256", "dead_tokens")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pLM: esm2_t6_8M_UR50D ..., a fair-esm .pt checkpoint, unirep-64/256/1900")
    p.add_argument("--layer", type=int, required=True, help="representation layer (0 = embeddings)")
    p.add_argument("--fasta", required=True, help="training corpus: FASTA, TSV/CSV (accession, sequence) or UniProt .dat")
    p.add_argument("--out", required=True, help="output SAE directory (SAELens layout)")
    p.add_argument("--arch", choices=["topk", "relu"], default="topk")
    p.add_argument("--latents", type=int, default=4096, help="number of SAE latents (d_sae)")
    p.add_argument("--k", type=int, default=32, help="active latents per residue (topk)")
    p.add_argument("--aux-k", type=int, default=None, help="dead latents in the AuxK loss (default d_in/2)")
    p.add_argument("--aux-coeff", type=float, default=DEFAULT_AUX_COEFF, help="AuxK loss coefficient (default 1/32)")
    p.add_argument("--dead-tokens", type=int, default=None,
                   help="a latent is dead (and enters the AuxK loss) when it has not fired for this many "
                        "residues (default: half the corpus' residues, at most 1,000,000)")
    p.add_argument("--l1-coeff", type=float, default=DEFAULT_L1_COEFF, help="L1 coefficient (relu)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=1024, help="residue vectors per SAE step")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="stop after this many SAE steps (cycling the corpus)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the corpus (default 1)")
    p.add_argument("--buffer-size", type=int, default=32768, help="shuffle buffer capacity in residue vectors")
    p.add_argument("--token-budget", type=int, default=8192, help="padded tokens per pLM forward batch")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0 = only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-proteins", type=int, default=None, help="use only the first N records")


# ---- the residue stream ------------------------------------------------------------------------
@dataclass
class Position:
    """Where the stream is: the next protein to push is #``protein`` of pLM batch ``batch`` of
    window ``window`` of epoch ``epoch`` (epoch order, windows and batches are deterministic)."""

    epoch: int = 0
    window: int = 0
    batch: int = 0
    protein: int = 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # Independent generator per epoch so the order never depends on how far a run got.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def iter_proteins_from(
    plm: ProteinLM, items: list[tuple[str, str]], layer: int, seed: int, token_budget: int, start: Position
) -> Iterator[tuple[Position, torch.Tensor]]:
    """Yield (position after this protein, representation) from ``start`` on, forever (epochs)."""
    epoch = start.epoch
    first = True
    while True:
        order = [items[i] for i in epoch_order(len(items), seed, epoch)]
        windows = [order[i : i + SORT_WINDOW] for i in range(0, len(order), SORT_WINDOW)]
        for w, window in enumerate(windows):
            if first and w < start.window:
                continue
            batches = token_batches(window, token_budget)
            for b, batch in enumerate(batches):
                if first and (w, b) < (start.window, start.batch):
                    continue
                skip = start.protein if first and (w, b) == (start.window, start.batch) else 0
                first = False
                reps = plm.representations([s for _, s in batch], layer, [r for r, _ in batch])
                for p in range(skip, len(batch)):
                    nxt = Position(epoch, w, b, p + 1)
                    if p + 1 == len(batch):  # normalise "end of batch" to "start of next batch"
                        nxt = Position(epoch, w, b + 1, 0)
                        if b + 1 == len(batches):
                            nxt = Position(epoch, w + 1, 0, 0) if w + 1 < len(windows) else Position(epoch + 1)
                    yield nxt, reps[p]
        first = False
        epoch += 1


class ShuffleBuffer:
    """Fixed-capacity buffer of residue vectors; when full, a random half is drawn out as batches."""

    def __init__(self, capacity: int, d: int, batch_size: int, generator: torch.Generator):
        self.data = torch.empty(capacity, d)
        self.n = 0
        self.batch_size = batch_size
        self.g = generator
        # draw a whole number of batches each time so no partial batch is left over
        self.draw_rows = max((capacity // 2) // batch_size, 1) * batch_size

    def push(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Add rows; returns the batches drawn while doing so (possibly none)."""
        out: list[torch.Tensor] = []
        i = 0
        while i < rows.shape[0]:
            take = min(rows.shape[0] - i, self.data.shape[0] - self.n)
            self.data[self.n : self.n + take] = rows[i : i + take]
            self.n += take
            i += take
            if self.n == self.data.shape[0]:
                out += self.draw(self.draw_rows)
        return out

    def draw(self, rows: int) -> list[torch.Tensor]:
        perm = torch.randperm(self.n, generator=self.g)
        drawn = self.data[perm[:rows]].clone()
        keep = perm[rows:]
        self.data[: keep.numel()] = self.data[keep].clone()
        self.n = keep.numel()
        return list(drawn.split(self.batch_size))


# ---- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Write DIR/checkpoint atomically: a temporary directory renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=out))
    try:
        torch.save(state, tmp / CHECKPOINT_FILE)
        old = None
        if final.exists():
            old = out / f".checkpoint.old.{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(out: Path) -> dict[str, Any]:
    path = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not path.is_file():
        raise SAEError(f"{out}: --resume given but there is no checkpoint ({path} is missing)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle/zip
        raise SAEError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None


# ---- training ----------------------------------------------------------------------------------
def _settings(args: argparse.Namespace, d_in: int, corpus_sha: str, n_residues: int) -> dict[str, Any]:
    if args.dead_tokens is None:
        # Gao et al. use 10M tokens of runs with billions; scale to the corpus so that AuxK also acts
        # in short CPU runs, but never wait longer than DEFAULT_DEAD_TOKENS.
        args.dead_tokens = min(DEFAULT_DEAD_TOKENS, max(n_residues // 2, 10 * args.batch_size))
    return {
        "model": args.model, "layer": args.layer, "arch": args.arch, "latents": args.latents,
        "k": args.k if args.arch == "topk" else None,
        "aux_k": (args.aux_k or max(d_in // 2, 1)) if args.arch == "topk" else None,
        "aux_coeff": args.aux_coeff, "dead_tokens": args.dead_tokens,
        "l1_coeff": args.l1_coeff if args.arch == "relu" else None,
        "lr": args.lr, "batch_size": args.batch_size, "buffer_size": args.buffer_size,
        "token_budget": args.token_budget, "seed": args.seed, "corpus_sha256": corpus_sha,
        "optimizer": "Adam", "max_proteins": args.max_proteins,
    }


def _check_args(args: argparse.Namespace) -> None:
    for name in ("latents", "batch_size", "buffer_size", "token_budget", "dead_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SAEError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.buffer_size < 2 * args.batch_size:
        raise SAEError(f"--buffer-size ({args.buffer_size}) must be at least twice --batch-size ({args.batch_size})")
    if args.arch == "topk" and not 1 <= args.k <= args.latents:
        raise SAEError(f"--k must be between 1 and --latents ({args.latents}), got {args.k}")
    if args.steps is not None and args.steps < 1:
        raise SAEError(f"--steps must be at least 1, got {args.steps}")
    if args.epochs is not None and args.epochs <= 0:
        raise SAEError(f"--epochs must be positive, got {args.epochs}")
    if args.max_proteins is not None and args.max_proteins < 1:
        raise SAEError(f"--max-proteins must be at least 1, got {args.max_proteins}")


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


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    t0 = time.time()
    corpus = read_proteins(args.fasta, strict=True, limit=args.max_proteins)
    corpus_sha = sha256_file(args.fasta)
    out = Path(args.out)
    device = resolve_device(args.device)
    plm = load_plm(args.model, device=args.device)
    plm.check_layer(args.layer)
    d_in = plm.d_model(args.layer)
    items = [(p.accession, p.sequence) for p in corpus.proteins]
    lengths = [min(len(s), plm.max_residues or len(s)) for _, s in items]
    n_residues = sum(lengths)
    settings = _settings(args, d_in, corpus_sha, n_residues)

    ckpt = load_checkpoint(out) if args.resume else None
    if ckpt is not None:
        diff = {k: (ckpt["settings"].get(k), settings.get(k)) for k in RESUME_KEYS if ckpt["settings"].get(k) != settings.get(k)}
        if diff:
            shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise SAEError(f"{out}: cannot resume, the checkpoint was made with other settings ({shown})")

    training_cfg = {k: v for k, v in settings.items() if k not in ("model", "layer", "corpus_sha256")}
    cfg = make_cfg(plm=plm.name, layer=args.layer, d_in=d_in, d_sae=args.latents, architecture=args.arch,
                   k=args.k if args.arch == "topk" else None, training=training_cfg)
    sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(args.seed)).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    buffer = ShuffleBuffer(args.buffer_size, d_in, args.batch_size, gen)
    fired = torch.zeros(args.latents, dtype=torch.long)  # per-latent firing counts -> sparsity.safetensors
    step, tokens, pos, pending, normalized = 0, 0, Position(), [], False
    if ckpt is not None:
        sae.load_state_dict(ckpt["sae"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        buffer.n = int(ckpt["buffer_n"])
        buffer.data[: buffer.n] = ckpt["buffer"]
        pending = list(ckpt["pending"].split(args.batch_size)) if ckpt["pending"].numel() else []
        fired = ckpt["fired"]
        step, tokens, pos = int(ckpt["step"]), int(ckpt["tokens"]), Position(**ckpt["position"])
        normalized = bool(ckpt["normalized"])
        log.info("resuming %s at step %d (epoch %d)", out, step, pos.epoch)

    # --epochs E means E x (corpus residues) / batch-size steps; the stream cycles the corpus
    # (a fresh seeded order each pass), so --steps and --epochs are both just a step budget.
    epochs = args.epochs if args.epochs is not None else 1.0
    max_steps = args.steps if args.steps is not None else max(math.ceil(epochs * n_residues / args.batch_size), 1)
    stream = iter_proteins_from(plm, items, args.layer, args.seed, args.token_budget, pos)
    last_ckpt = step
    shown: dict[str, float] = {}  # exponentially smoothed step statistics for the progress bar

    def checkpoint() -> None:
        rest = torch.cat(pending) if pending else torch.empty(0, d_in)
        save_checkpoint(out, {
            "settings": settings, "sae": sae.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "buffer": buffer.data[: buffer.n].clone(), "buffer_n": buffer.n,
            "pending": rest, "fired": fired, "step": step, "tokens": tokens, "normalized": normalized,
            "position": vars(pos).copy(),
        })

    bar = tqdm(total=max_steps, initial=step, desc=f"train-sae {plm.name} L{args.layer}", unit="step", mininterval=1.0)
    sae.train()
    while step < max_steps:
        if not pending:
            # Feed proteins until the buffer yields batches; the first fill also sets the normalisation.
            pos, rep = next(stream)
            pending = buffer.push(rep)
            if pending and not normalized:
                sample = torch.cat(pending + [buffer.data[: buffer.n]])
                mean = sample.mean(0)
                scale = float((sample - mean).pow(2).sum(-1).mean().div(d_in).sqrt())
                sae.set_normalization(mean, scale if scale > 0 else 1.0)
                normalized = True
            continue
        x = pending.pop(0).to(device)
        xn = sae.normalize(x)
        res = sae.training_loss(xn)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()
        sae.remove_parallel_grad_()  # keep decoder rows on the unit sphere (per latent)...
        opt.step()
        sae.normalize_decoder_()  # ...and remove the drift Adam still causes
        fired += (res["z"] > 0).sum(0).cpu()
        step += 1
        tokens += x.shape[0]
        bar.update(1)
        for key, value in _step_stats(sae, xn, res).items():
            shown[key] = value if key not in shown else 0.95 * shown[key] + 0.05 * value
        if step % 10 == 0 or step == max_steps:
            bar.set_postfix({key: f"{v:.3g}" for key, v in shown.items()})
        if args.checkpoint_every and step - last_ckpt >= args.checkpoint_every and step < max_steps:
            checkpoint()
            last_ckpt = step
    bar.close()
    checkpoint()  # the final state, so that --resume --steps N can train further

    freq = fired.double() / max(tokens, 1)
    sparsity = torch.log10(freq + 1e-10).float()  # SAELens: log10 feature firing frequency
    sae.cfg["plmscope"]["corpus"] = {
        "path": str(Path(args.fasta).resolve()), "sha256": corpus_sha,
        "n_proteins": len(items), "n_residues": n_residues,
    }
    sae.cfg["plmscope"]["training"].update({
        "steps": step, "tokens": tokens, "device": str(device), "wall_s": round(time.time() - t0, 1),
        "final": {key: round(v, 5) for key, v in shown.items()},
    })
    save_sae(sae.cpu(), out, sparsity=sparsity)
    log.info("saved SAE to %s (%d steps, %d residue vectors)", out, step, tokens)
    return 0
