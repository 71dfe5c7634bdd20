"""A small real atlas for the analysis integration test, written with the real schema, the real
UniRep-64 pLM and a real (randomly initialised, seeded) TopK SAE on demo proteins.

It exists so that `plmscope analyze` can be tested end-to-end independently of the full build;
the shared ``tiny_atlas`` fixture (tests/conftest.py, built by `plmscope build`) is tested too.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from plmscope.store.schema import AMINO_ACIDS, HIST_BINS, SCHEMA_VERSION, create_all

DEMO = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "demo"
N_PROTEINS = 60
D_SAE = 48


def _demo_proteins(n: int) -> list[dict]:
    # n / 3 single-location proteins from each of three classes, so the probe has labels to learn
    quota = {"cytoplasm": n // 3, "plasma membrane": n // 3, "nucleus": n - 2 * (n // 3)}
    out = []
    csv.field_size_limit(10**8)
    with gzip.open(DEMO / "proteins.tsv.gz", "rt") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            pf = json.loads(row["pfam"] or "[]")
            loc = row["location"]
            if pf and quota.get(loc, 0) > 0 and int(row["length"]) <= 160 and set(row["sequence"]) <= set(AMINO_ACIDS):
                out.append({**row, "pfam": pf})
                quota[loc] -= 1
            if not any(quota.values()):
                break
    return out


@pytest.fixture(scope="session")
def mini_atlas(tmp_path_factory) -> Path:
    from plmscope.plm import load_plm
    from plmscope.sae.io import sae_id, sae_weights_bytes
    from plmscope.sae.model import SparseAutoencoder, make_cfg

    prots = _demo_proteins(N_PROTEINS)
    plm = load_plm("unirep-64", device="cpu")
    cfg = make_cfg(plm="unirep-64", layer=1, d_in=plm.d_model(1), d_sae=D_SAE, architecture="topk", k=6)
    sae = SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(0)).eval()
    sid = sae_id(cfg)
    reps = plm.representations([p["sequence"] for p in prots], 1)
    with torch.no_grad():
        zs = [sae.encode(r).numpy() for r in reps]
    lmax = np.max([z.max(axis=0) for z in zs], axis=0)

    path = tmp_path_factory.mktemp("mini") / "mini.duckdb"
    con = duckdb.connect(str(path))
    create_all(con)
    con.executemany("INSERT INTO atlas_meta VALUES (?, ?)", [["schema_version", json.dumps(SCHEMA_VERSION)], ["atlas_id", '"mini"']])
    bg = [sum(p["sequence"].count(a) for p in prots) for a in AMINO_ACIDS]
    con.execute(
        "INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, now(), 0)",
        [sid, "unirep-64", 1, "topk", 64, D_SAE, 6, json.dumps(cfg), int((lmax <= 0).sum()), len(prots),
         sum(len(p["sequence"]) for p in prots), [0.0] * (HIST_BINS + 1), bg, sae_weights_bytes(sae)],
    )
    fams = {}
    for p, z, r in zip(prots, zs, reps):
        locs = p["location"].split(";")
        con.execute(
            "INSERT INTO proteins (accession, length, sequence, locations, families, fields) VALUES (?, ?, ?, ?, ?, '{}')",
            [p["accession"], len(p["sequence"]), p["sequence"], locs, sorted({d["pfam"] for d in p["pfam"]})],
        )
        for d in p["pfam"]:
            fams[d["pfam"]] = d["name"]
            con.execute("INSERT INTO annotations VALUES (?, 'pfam', 'Pfam domain', ?, ?, ?, ?, ?)",
                        [p["accession"], d["pfam"], d["name"], d["start"], d["end"], d["score"]])
        con.execute("INSERT INTO protein_embeddings VALUES (?, ?, ?)", [sid, p["accession"], r.mean(0).tolist()])
        for j in np.flatnonzero(z.max(axis=0) > 0):
            con.execute("INSERT INTO protein_latent_stats VALUES (?, ?, ?, ?, ?, ?)",
                        [sid, p["accession"], int(j), float(z[:, j].max()), float(z[:, j].sum()), int((z[:, j] > 0).sum())])
    con.executemany("INSERT INTO families VALUES (?, ?, '')", [[k, v] for k, v in fams.items()])
    for j in range(D_SAE):
        col = [z[:, j] for z in zs]
        act = np.concatenate(col)
        aa = [sum(int(((z[:, j] > 0) & (np.frombuffer(p["sequence"].encode(), "S1") == a.encode())).sum())
                  for p, z in zip(prots, zs)) for a in AMINO_ACIDS]
        con.execute(
            "INSERT INTO latents (sae_id, latent, max_act, mean_act, n_active_residues, n_active_proteins, frac_residues, "
            "frac_proteins, is_dead, hist_counts, aa_counts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [sid, j, float(lmax[j]), float(act[act > 0].mean()) if (act > 0).any() else 0.0, int((act > 0).sum()),
             int(sum((c > 0).any() for c in col)), float((act > 0).mean()), float(np.mean([(c > 0).any() for c in col])),
             bool(lmax[j] <= 0), [0] * HIST_BINS, aa],
        )
        order = np.argsort([-c.max() for c in col])[:5]
        for rank, i in enumerate(order):
            if col[i].max() <= 0:
                break
            q = np.round(np.clip(col[i] / lmax[j], 0, 1) * 255).astype(np.uint8).tobytes()
            con.execute("INSERT INTO latent_examples VALUES (?, ?, 'top', NULL, ?, ?, ?, ?, ?, ?)",
                        [sid, j, rank, prots[i]["accession"], float(col[i].max()), int(col[i].argmax()) + 1,
                         int((col[i] > 0).sum()), q])
    con.close()
    return path
