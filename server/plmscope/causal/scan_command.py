"""In-silico saturation mutagenesis of SAE latents over whole proteins or a FASTA file.

For every protein and every residue in ``--start..--end`` (default: all), every substitution by
another of the 20 amino acids, and per latent of ``--latents``: its activation at the mutated
residue and its maximum over the variant, next to the wild type's, and the model's own variant
score (ESM-2: masked-marginal log-ratio, Meier et al. 2021; UniRep: change of the sequence's
log-likelihood).  One row per (variant, latent), written as CSV or Parquet (by ``--out``'s suffix).
Variants run in length-equal batches of ``--token-budget`` tokens, on CUDA when present.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .scan import ScanSettings, scan

log = logging.getLogger(__name__)
COLUMNS = ["record", "position", "wild_type", "mutant", "latent", "site_act", "wt_site_act", "max_act", "wt_max_act", "score"]


@dataclass(frozen=True)
class ScanCommandSettings:
    sae: Path
    fasta: Path
    latents: tuple[int, ...]
    out: Path
    start: int | None = None
    end: int | None = None
    max_proteins: int | None = None
    device: str = "auto"
    token_budget: int = 8192
    score: bool = True

    def __post_init__(self) -> None:
        if self.out.suffix.lower() not in (".csv", ".parquet"):
            raise InputError(f"--out {self.out}: write .csv or .parquet")
        if not self.latents:
            raise InputError("--latents names no latent: give e.g. --latents 3,17")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ScanCommandSettings":
        latents = tuple(dict.fromkeys(int(x) for x in re.findall(r"\d+", args.latents or "")))
        return cls(sae=Path(args.sae), fasta=Path(args.fasta), latents=latents, out=Path(args.out), start=args.start,
                   end=args.end, max_proteins=args.max_proteins, device=args.device, token_budget=args.token_budget,
                   score=not args.no_score)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE directory (cfg.json + sae_weights.safetensors); its pLM is loaded")
    p.add_argument("--fasta", required=True, help="proteins to scan: FASTA, TSV/CSV or UniProt .dat")
    p.add_argument("--latents", required=True, help="latents to record, comma-separated (e.g. 3,17,250)")
    p.add_argument("--out", required=True, help="output table: .csv or .parquet")
    p.add_argument("--start", type=int, default=None, help="first residue mutated (1-based; default 1)")
    p.add_argument("--end", type=int, default=None, help="last residue mutated (inclusive; default the last)")
    p.add_argument("--max-proteins", type=int, default=None, help="scan only the first N records")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--token-budget", type=int, default=8192, help="tokens per forward batch")
    p.add_argument("--no-score", action="store_true", help="skip the model's own variant score")


def run(args: argparse.Namespace) -> int:
    s = ScanCommandSettings.from_args(args)
    n = run_scan(s)
    print(f"scan: {n} rows -> {s.out}")
    return 0


def run_scan(s: ScanCommandSettings) -> int:
    from tqdm import tqdm

    from ..plm.base import load_plm
    from ..sae.io import load_sae
    from ..sequences import read_proteins
    from ..vocab import AMINO_ACIDS

    sae = load_sae(s.sae).eval()
    plm = load_plm(sae.plm, s.device)
    sae = sae.to(plm.device)
    corpus = read_proteins(s.fasta, limit=s.max_proteins)
    settings = ScanSettings(start=s.start, end=s.end, token_budget=s.token_budget, score=s.score)
    proteins = []
    for p in corpus.proteins:
        if plm.max_residues is not None and len(p.sequence) > plm.max_residues:
            log.warning("%s: %d residues, more than %s accepts; skipped", p.accession, len(p.sequence), plm.name)
        elif (s.start or 1) > len(p.sequence):
            log.warning("%s: %d residues, --start %d lies beyond it; skipped", p.accession, len(p.sequence), s.start)
        else:
            proteins.append(p)
    total = sum(sum(1 for i in settings.window(len(p.sequence)) for a in AMINO_ACIDS if a != p.sequence[i]) for p in proteins)
    rows: list[dict] = []
    with tqdm(total=total, unit="variant", desc=f"scan {plm.name} L{sae.layer}") as bar:
        for p in proteins:
            res = scan(plm, sae, p.sequence, s.latents, settings, progress=bar.update)
            rows += list(res.rows(p.accession))
    write_table(rows, s.out)
    return len(rows)


def write_table(rows: list[dict], out: Path) -> None:
    """``rows`` (COLUMNS) as CSV or Parquet (by ``out``'s suffix), written by DuckDB and published
    atomically: an interrupted scan leaves no half-written table."""
    import duckdb
    import numpy as np

    from .. import atomic

    text = ("record", "wild_type", "mutant")
    columns = {name: np.array([r[name] for r in rows], dtype=object if name in text else float if name == "score" else None)
               for name in COLUMNS}
    if not rows:  # typed empty columns
        columns = {name: np.array([], dtype=str if name in text else float) for name in COLUMNS}
    fmt = "parquet" if out.suffix.lower() == ".parquet" else "csv, header true"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.writing(out) as tmp, duckdb.connect() as con:
        con.register("scan_rows", columns)
        target = str(tmp).replace("'", "''")
        con.execute(f"COPY (SELECT {', '.join(COLUMNS)} FROM scan_rows) TO '{target}' (FORMAT {fmt})")
