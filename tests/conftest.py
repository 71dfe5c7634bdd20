"""Shared fixtures.

``tiny_atlas``: a real atlas built once per session through ``plmscope build`` (the public command)
from ~70 real demo proteins (structure-mapped ones, proteins with Swiss-Prot flat-file entries and
random ones, plus a few deliberately bad records), a small structures manifest (with one missing
file and one mismatching chain), a tiny random ESM-2 in fair-esm's format and a small TopK SAE.
"""

from __future__ import annotations

import csv
import gzip
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._paths import DEMO


@dataclass
class TinyAtlas:
    path: Path  # the atlas .duckdb
    sae_dir: Path
    corpus: Path  # the TSV the atlas was built from
    plm: str  # pLM spec (checkpoint path of the tiny random ESM-2)
    manifest: Path
    structures: Path
    build_args: list[str]  # the exact `plmscope build` arguments (without --out)


def demo_rows() -> list[dict]:
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def make_corpus(path: Path, n_random: int = 40, seed: int = 7) -> tuple[Path, list[dict]]:
    """A TSV corpus of real demo proteins (+ 3 bad records) and the rows used."""
    rows = demo_rows()
    rng = random.Random(seed)
    with open(DEMO.parent / "demo" / "swissprot_sample.dat") as fh:
        flat = {line.split()[1].rstrip(";") for line in fh if line.startswith("AC ")}
    struct = [r for r in rows if r["has_structure"] == "true" and int(r["length"]) <= 400][:18]
    long_one = [r for r in rows if r["has_structure"] == "true" and 1022 < int(r["length"]) <= 1300][:1]
    taken = {r["accession"] for r in struct + long_one}
    flat_rows = [r for r in rows if r["accession"] in flat and r["accession"] not in taken and int(r["length"]) <= 400][:8]
    used = {r["accession"] for r in struct + long_one + flat_rows}
    rest = [r for r in rows if r["accession"] not in used and int(r["length"]) <= 300]
    chosen = struct + long_one + flat_rows + rng.sample(rest, n_random)
    cols = list(rows[0])
    bad = [dict(chosen[0]), dict(chosen[1], accession="BAD_RESIDUE", sequence="MKV1LLA"),
           dict(chosen[1], accession="EMPTY_SEQ", sequence="")]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, delimiter="\t")
        w.writeheader()
        for r in chosen + bad:
            w.writerow(r)
    return path, chosen


def make_manifest(path: Path, chosen: list[dict]) -> Path:
    """The demo manifest rows of the chosen proteins + a missing file + a mismatching chain."""
    with open(DEMO / "structures.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    acc = {r["accession"] for r in chosen}
    keep = [r for r in rows if r["accession"] in acc]
    no_struct = [r["accession"] for r in chosen if r["has_structure"] != "true"]
    keep.append(dict(keep[0], accession=no_struct[0], file="structures/does_not_exist.pdb"))
    keep.append(dict(keep[1], accession=no_struct[1]))  # someone else's chain: must not match
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(keep)
    return path


def make_plm(directory: Path) -> str:
    from plmscope.plm.esm2 import save_random_esm2

    path = directory / "tiny_esm2.pt"
    if not path.exists():
        save_random_esm2(path, None, num_layers=2, embed_dim=64, attention_heads=4, seed=0)
    return str(path)


def make_sae(directory: Path, plm: str, layer: int = 2, d_in: int = 64, d_sae: int = 128, k: int = 8,
             seed: int = 0) -> Path:
    """A small TopK SAE in the project's directory format (seeded random init: every latent
    direction is a unit vector, which gives varied, reproducible activations)."""
    import torch

    from plmscope.sae.io import save_sae
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    if (directory / "cfg.json").exists():
        return directory
    cfg = make_cfg(plm=plm, layer=layer, d_in=d_in, d_sae=d_sae, architecture="topk", k=k)
    sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(seed))
    save_sae(sae, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_inputs")
    corpus, chosen = make_corpus(root / "corpus.tsv")
    manifest = make_manifest(root / "structures.tsv", chosen)
    plm = make_plm(root)
    sae_dir = make_sae(root / "sae", plm)
    args = ["--corpus", str(corpus), "--structures", str(DEMO / "structures"), "--manifest", str(manifest),
            "--families", str(DEMO / "pfam_families.tsv"), "--sae", str(sae_dir), "--top-n", "6", "--bins", "4",
            "--per-bin", "3", "--protein-top", "8", "--chunk-size", "16", "--token-budget", "2048",
            "--checkpoint-every", "0", "--device", "cpu"]
    return {"root": root, "corpus": corpus, "chosen": chosen, "manifest": manifest, "plm": plm,
            "sae_dir": sae_dir, "args": args}


@pytest.fixture(scope="session")
def tiny_atlas(tiny_inputs, tmp_path_factory) -> TinyAtlas:
    from plmscope.cli import main

    out = tmp_path_factory.mktemp("tiny_atlas") / "atlas.duckdb"
    rc = main(["build", *tiny_inputs["args"], "--out", str(out)])
    assert rc == 0 and out.exists()
    return TinyAtlas(path=out, sae_dir=tiny_inputs["sae_dir"], corpus=tiny_inputs["corpus"], plm=tiny_inputs["plm"],
                     manifest=tiny_inputs["manifest"], structures=DEMO / "structures", build_args=tiny_inputs["args"])


@pytest.fixture(scope="session")
def client(tiny_atlas):
    """FastAPI TestClient over the real app serving ``tiny_atlas`` with its real models (lifespan run).

    No rate limit here: the whole session shares one client address; the limit has its own tests.
    Server errors come back as 500 responses (as a browser would see them), not as exceptions.
    """
    from fastapi.testclient import TestClient

    from plmscope.settings import Settings
    from plmscope.web.app import create_app

    app = create_app(Settings(atlas=tiny_atlas.path, device="cpu", rate_limit_per_minute=0))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
