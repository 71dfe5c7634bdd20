"""What one atlas build is asked to do: ``BuildSettings``, checked once when made.

``plmscope build`` makes them from its flags (``BuildSettings.from_args``); code that builds an
atlas itself makes them directly.  Errors name the flag, so a user and a caller read the same
message.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import InputError
from .aggregate import AggregateSettings

ENCODE_MODES = ("auto", "dense", "screen")
DTYPES = ("auto", "fp32", "bf16", "fp16")  # plm.base.DTYPES, restated so that settings do not import torch
PATH_FIELDS = ("corpus", "out", "state_out", "structures", "manifest", "pfam", "families")


@dataclass(frozen=True)
class BuildSettings:
    corpus: Path
    saes: tuple[Path, ...]
    out: Path | None = None  # the atlas; None with state_out (a shard build)
    state_out: Path | None = None  # keep the build state here and write no atlas
    structures: Path | None = None
    manifest: Path | None = None
    pfam: Path | None = None
    families: Path | None = None
    resume: bool = False
    top_n: int = 24
    bins: int = 5
    per_bin: int = 8
    protein_top: int = 16
    token_budget: int = 8192
    device: str = "auto"
    dtype: str = "auto"  # pLM precision (plm.base.DTYPES)
    encode: str = "auto"
    pipeline: int = 1
    max_length: int | None = None
    limit: int | None = None
    chunk_size: int = 512
    checkpoint_every: float = 60.0  # a kill loses at most this + one chunk (docs/atlas.md)
    shard: tuple[int, int] = (0, 1)  # or "i/n"
    # residue codes of up to this many concept proteins (annotated or with a structure; the ones
    # analyze picks by default, vocab.concept_sample) are kept in the atlas for analyze's concept step
    concept_proteins: int = 1000

    def __post_init__(self) -> None:
        for name in PATH_FIELDS:  # str paths accepted, Paths kept
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "saes", tuple(Path(d) for d in self.saes))
        if isinstance(self.shard, str):
            object.__setattr__(self, "shard", parse_shard(self.shard))
        if not self.saes:
            raise InputError("give at least one --sae DIR")
        i, n = self.shard
        if not 0 <= i < n:
            raise InputError(f"--shard {i}/{n}: expected i/n with 0 <= i < n")
        if self.out is None and self.state_out is None:
            raise InputError("give --out ATLAS (or --state-out DIR for a shard build)")
        if n > 1 and self.state_out is None:
            raise InputError("--shard i/n needs --state-out DIR; merge the shard states with `plmscope merge`")
        for name in ("top_n", "bins", "per_bin", "protein_top", "token_budget", "chunk_size", "max_length", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{flag(name)} must be at least 1, got {value}")
        if self.concept_proteins < 0:
            raise InputError(f"--concept-proteins must be 0 (none) or more, got {self.concept_proteins}")
        if self.encode not in ENCODE_MODES:
            raise InputError(f"--encode {self.encode!r}: expected one of {', '.join(ENCODE_MODES)}")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.pipeline not in (0, 1):
            raise InputError(f"--pipeline {self.pipeline}: expected 0 or 1")

    @classmethod
    def from_args(cls, args) -> "BuildSettings":
        """From ``plmscope build``'s parsed flags (``add_arguments``)."""
        return cls(
            corpus=args.corpus, saes=args.sae, out=args.out, state_out=args.state_out, structures=args.structures,
            manifest=args.manifest, pfam=args.pfam, families=args.families, resume=args.resume, top_n=args.top_n,
            bins=args.bins, per_bin=args.per_bin, protein_top=args.protein_top, token_budget=args.token_budget,
            device=args.device, dtype=args.dtype, encode=args.encode, pipeline=args.pipeline, max_length=args.max_length,
            limit=args.limit, chunk_size=args.chunk_size, checkpoint_every=args.checkpoint_every,
            shard=args.shard, concept_proteins=args.concept_proteins)

    @property
    def writes_atlas(self) -> bool:
        return self.state_out is None

    @property
    def state_dir(self) -> Path:
        """The build-state directory: ``--state-out``, else beside the atlas."""
        return self.state_out if self.state_out is not None else Path(f"{self.out}.build-state")

    def aggregate_settings(self, context_free: int = 0) -> AggregateSettings:
        """``context_free``: the pLM's ``context_free_positions``."""
        return AggregateSettings(self.top_n, self.bins, self.per_bin, self.protein_top, context_free=context_free)

    def fingerprinted(self) -> dict:
        """The settings that change the atlas: a build state resumes or merges only with the same."""
        fp = {k: getattr(self, k) for k in ("top_n", "bins", "per_bin", "protein_top", "token_budget",
                                            "max_length", "limit", "chunk_size", "encode", "concept_proteins")}
        if self.dtype != "auto":  # the activations differ in precision; "auto" keeps earlier states' fingerprints
            fp["dtype"] = self.dtype
        return fp


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected i/n with 0 <= i < n") from None
    return i, n


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


DEFAULTS = {f.name: f.default for f in fields(BuildSettings)}
