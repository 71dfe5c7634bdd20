"""Merge shard states of an atlas build into one atlas.

A big build is spread over machines by chunks of the corpus::

    plmscope build --corpus C --sae S --shard 0/4 --state-out st0   # on machine 0
    ...                                                              # shards 1..3 elsewhere
    plmscope merge --state st0 --state st1 --state st2 --state st3 --out atlas.duckdb

Each shard writes the mergeable aggregates of its chunks (counters, top-N and sketch reservoirs
with their sparse vectors) plus its per-protein spill files; ``merge`` adds the aggregates
(``SAEAggregate.merge``: exact, order-independent) and writes the atlas that one pass over the whole
corpus would have written.  All shards must come from the same inputs and settings (checked with
the state fingerprint) and together cover every chunk exactly once.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .buildstate import built_from, read_manifest
from .publish import print_summary, write_atlas

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", action="append", required=True, help="a shard's --state-out directory (repeatable)")
    p.add_argument("--out", required=True, help="atlas file to write (an existing atlas gets the SAEs added)")


@dataclass(frozen=True)
class MergeSettings:
    states: tuple[Path, ...]
    out: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", tuple(Path(s) for s in self.states))
        object.__setattr__(self, "out", Path(self.out))
        if not self.states:
            raise InputError("give at least one --state DIR")
        seen = set()
        for s in self.states:
            if s.resolve() in seen:
                raise InputError(f"--state {s} is given twice; give each shard's state once")
            seen.add(s.resolve())

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MergeSettings":
        return cls(states=args.state, out=args.out)


def run(args: argparse.Namespace) -> int:
    print_summary(merge(MergeSettings.from_args(args)))
    return 0


def merge(settings: MergeSettings) -> dict:
    """Write the atlas of the shard states; returns its summary (``publish.write_atlas``).  A rerun
    after a merge killed once the atlas was published finds it done and returns its summary."""
    if settings.out.exists():
        from ..store.reader import read_existing_meta

        meta = read_existing_meta(settings.out)
        m0 = read_manifest(settings.states[0])
        shards = (meta.get("build_settings") or {}).get("shards")
        if shards == len(settings.states) and built_from(meta, m0["fingerprint"], [s["sae_id"] for s in m0["saes"]]):
            log.info("%s already holds the merge of these states", settings.out)
            return meta["summary"]
    return write_atlas(list(settings.states), settings.out)
