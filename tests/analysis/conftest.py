"""A small real atlas for the analysis tests, built by ``plmscope build`` (the same code path as
every atlas) from 60 real demo proteins chosen so that each of three location classes has 20
single-location proteins with Pfam domains (the probe needs labels, family specificity needs
families), with the real UniRep-64 pLM and a seeded random-init TopK SAE.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from plmscope.vocab import AMINO_ACIDS

from tests._paths import DEMO
N_PROTEINS = 60
D_SAE = 48
STANDARD = set(AMINO_ACIDS)


def _demo_rows(n: int) -> list[dict]:
    quota = {"cytoplasm": n // 3, "plasma membrane": n // 3, "nucleus": n - 2 * (n // 3)}
    out = []
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            loc = row["location"]
            if json.loads(row["pfam"] or "[]") and quota.get(loc, 0) > 0 and int(row["length"]) <= 160 and set(row["sequence"]) <= STANDARD:
                out.append(row)
                quota[loc] -= 1
            if not any(quota.values()):
                break
    return out


@pytest.fixture(scope="session")
def mini_atlas(tmp_path_factory) -> Path:
    import torch

    from plmscope.cli import main
    from plmscope.sae.io import save_sae
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    root = tmp_path_factory.mktemp("mini")
    rows = _demo_rows(N_PROTEINS)
    corpus = root / "corpus.tsv"
    with open(corpus, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    cfg = make_cfg(plm="unirep-64", layer=1, d_in=64, d_sae=D_SAE, architecture="topk", k=6)
    save_sae(SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0)), root / "sae")
    out = root / "mini.duckdb"
    rc = main(["build", "--corpus", str(corpus), "--sae", str(root / "sae"), "--out", str(out),
               "--families", str(DEMO / "pfam_families.tsv"), "--top-n", "5", "--checkpoint-every", "0", "--device", "cpu"])
    assert rc == 0
    return out
