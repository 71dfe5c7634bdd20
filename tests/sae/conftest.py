"""Shared fixtures for the SAE tests: small real corpora from the demo data and a tiny trained SAE."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest

from plmscope.cli import main

from tests._paths import DEMO as _DEMO

DEMO = _DEMO / "proteins.tsv.gz"


def write_fasta(path: Path, start: int, count: int) -> Path:
    if not DEMO.exists():
        pytest.fail(f"demo data not found at {DEMO} (data/demo is committed with the project)")
    with gzip.open(DEMO, "rt") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))[start : start + count]
    path.write_text("".join(f">{r['accession']}\n{r['sequence']}\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def demo_fasta(tmp_path_factory) -> Path:
    """~40 real demo proteins (training corpus)."""
    return write_fasta(tmp_path_factory.mktemp("corpus") / "train.fasta", 0, 40)


@pytest.fixture(scope="session")
def heldout_fasta(tmp_path_factory) -> Path:
    """8 other demo proteins (evaluation corpus)."""
    return write_fasta(tmp_path_factory.mktemp("corpus") / "heldout.fasta", 1000, 8)


TINY_TRAIN = ["--model", "unirep-64", "--layer", "2", "--latents", "64", "--k", "8",
              "--batch-size", "128", "--buffer-size", "1024", "--lr", "3e-3"]


@pytest.fixture(scope="session")
def trained_sae(tmp_path_factory, demo_fasta) -> Path:
    out = tmp_path_factory.mktemp("sae") / "unirep64_L2"
    assert main(["train-sae", *TINY_TRAIN, "--fasta", str(demo_fasta), "--out", str(out), "--steps", "60"]) == 0
    return out
