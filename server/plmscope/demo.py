"""Build the offline demo atlas (real Swiss-Prot proteins, UniRep-256, a TopK SAE on each of its
four layers) and serve it.

``plmscope demo`` runs, in order, the same public commands a user would run (so the demo proves
them): prepare the demo corpus from ``data/demo`` -> (``train-sae`` unless the committed SAEs in
``data/demo/sae`` are used) -> ``build`` -> ``analyze`` -> ``serve``.  Every step is skipped when its
output already exists for the same inputs, so a second ``plmscope demo`` starts serving at once.

The corpus is deterministic: every protein with a structure, every protein with a UniProt flat-file
entry, then a seeded uniform sample of the rest up to ``--proteins``.  UniProt features from
``swissprot_sample.dat`` and NLS motif matches from ``nls.tsv`` are attached as annotations.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import logging
import random
import time
from pathlib import Path

from .errors import InputError
from .provenance import sha256_file
from .store.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "demo"
COMMITTED_SAES = DATA / "sae"  # one directory per layer: L{layer}-topk{latents}-k{k} (train-sae's names)

DEMO_MODEL = "unirep-256"
DEMO_LAYERS = (1, 2, 3, 4)  # every layer of UniRep-256: the paper's comparisons are across layers
DEMO_SEED = 20140101
DEMO_LATENTS, DEMO_K = 512, 32  # chosen on the selection set (scripts/demo_saes.py, README "The demo atlas")

# The committed SAEs are reproduced exactly by these train-sae settings on the committed corpus
# (one pLM pass trains all four; each SAE is bit-identical to one trained alone).  The token budget
# is large because UniRep's recurrent step is cheaper per residue in wide batches.
SAE_TRAIN_ARGS = [
    "--model", DEMO_MODEL, "--layer", *map(str, DEMO_LAYERS), "--arch", "topk",
    "--latents", str(DEMO_LATENTS), "--k", str(DEMO_K), "--seed", "0", "--token-budget", "65536",
]
SAE_CORPUS = 8000  # the demo selection the SAEs' train / selection / report sets are cut from


def committed_sae_dirs() -> list[Path]:
    """The committed SAEs, in layer order."""
    from .sae.train import run_name

    return [COMMITTED_SAES / run_name("topk", layer, DEMO_LATENTS, DEMO_K) for layer in DEMO_LAYERS]


# The SAE corpus split by MMseqs2 cluster (homology.py): the SAE is trained on "train", its layer
# and settings are chosen on "selection", and the numbers quoted for it come from "report"; no
# cluster spans two sets.  The assignment is committed (SETS_FILE, written by
# `python scripts/demo_sets.py`) so that `plmscope demo --retrain-sae` trains on the same proteins
# whichever MMseqs2 a machine has; tests/test_demo.py checks it against a fresh clustering.
SETS_FILE = DATA / "sae_sets.json"
SWEEP_FILE = DATA / "eval" / "sweep.json"  # scripts/demo_saes.py: the k / size sweep the findings show
SET_FRACTIONS = {"train": 0.8, "selection": 0.1, "report": 0.1}
SET_SEED = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=REPO / "var" / "demo", help="where corpus, SAE and atlas are written")
    p.add_argument("--proteins", type=int, default=3000, help="proteins in the demo atlas (structures always kept)")
    p.add_argument("--retrain-sae", action="store_true", help="train the four SAEs again instead of using data/demo/sae")
    p.add_argument("--no-analyze", action="store_true", help="skip `plmscope analyze`")
    p.add_argument("--no-serve", action="store_true", help="stop after building the atlas")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def _read_demo_table() -> list[dict[str, str]]:
    with gzip.open(DATA / "proteins.tsv.gz", "rt", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _flat_file_features() -> dict[str, list[dict]]:
    from .sequences import read_proteins

    corpus = read_proteins(DATA / "swissprot_sample.dat")
    return {
        p.accession: [
            {"kind": a.kind, "type": a.type, "label": a.label, "start": a.start, "end": a.end, "_seq": p.sequence}
            for a in p.annotations
        ]
        for p in corpus.proteins
    }


def _nls_motifs() -> dict[str, list[dict]]:
    motifs: dict[str, list[dict]] = {}
    with open(DATA / "nls.tsv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            motifs.setdefault(row["accession"], []).append(
                {
                    "kind": "nls",
                    "type": "nuclear localization signal",
                    "label": row["motif"],
                    "start": int(row["start"]),
                    "end": int(row["end"]),
                }
            )
    return motifs


def select_accessions(rows: list[dict[str, str]], n: int, flat_file: set[str], seed: int = DEMO_SEED) -> list[str]:
    """Structures and flat-file entries first, then a seeded uniform sample of the rest."""
    must = [r["accession"] for r in rows if r["has_structure"] == "true" or r["accession"] in flat_file]
    rest = sorted(r["accession"] for r in rows if r["accession"] not in set(must))
    extra = random.Random(seed).sample(rest, max(0, min(len(rest), n - len(must))))
    return must + extra


def write_corpus(out: Path, n: int) -> Path:
    """The demo corpus as a TSV the build reads like any user's table."""
    rows = _read_demo_table()
    features = _flat_file_features()
    nls = _nls_motifs()
    chosen = set(select_accessions(rows, n, set(features)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    columns = ["accession", "entry_name", "protein_name", "organism", "sequence", "location", "pfam", "annotations", "go_cc", "go_mf", "go_bp"]
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            acc = row["accession"]
            if acc not in chosen:
                continue
            # Flat-file features only when the entry's sequence is the corpus sequence (positions!).
            feats = [
                {k: v for k, v in f.items() if k != "_seq"}
                for f in features.get(acc, [])
                if f["_seq"] == row["sequence"]
            ]
            writer.writerow({**row, "annotations": json.dumps(feats + nls.get(acc, []))})
    tmp.replace(out)
    return out


def sae_corpus() -> list[tuple[str, str]]:
    """(accession, sequence) of the SAE corpus: the demo selection of SAE_CORPUS proteins, sorted by
    accession (whatever ``--proteins`` is)."""
    rows = _read_demo_table()
    seq = {r["accession"]: r["sequence"] for r in rows}
    return [(a, seq[a]) for a in sorted(select_accessions(rows, SAE_CORPUS, set(_flat_file_features())))]


def compute_sae_sets() -> dict:
    """Cluster the SAE corpus with MMseqs2 and deal whole clusters to SET_FRACTIONS (SETS_FILE's content)."""
    from .homology import assign_sets, cluster

    records = sae_corpus()
    clustering = cluster(records)
    sets = assign_sets(clustering.representative, SET_FRACTIONS, seed=SET_SEED)
    counts = {
        name: {"proteins": int((sets == name).sum()),
               "clusters": len({r for r, s in zip(clustering.representative, sets) if s == name})}
        for name in SET_FRACTIONS
    }
    fasta = "".join(f">{a}\n{q}\n" for a, q in records)
    return {
        "command": "python scripts/demo_sets.py",
        "input": {"n_proteins": len(records), "fasta_sha256": hashlib.sha256(fasta.encode()).hexdigest()},
        "clustering": clustering.summary(),
        "fractions": SET_FRACTIONS, "seed": SET_SEED, "counts": counts,
        "proteins": [[a, r, str(s)] for a, r, s in zip(clustering.ids, clustering.representative, sets)],
    }


def format_sae_sets(data: dict) -> str:
    """SETS_FILE's text: JSON with one protein per line, so that a change reads as a small diff."""
    head = {k: v for k, v in data.items() if k != "proteins"}
    lines = [json.dumps(p) for p in data["proteins"]]
    return json.dumps(head, indent=1)[:-2] + ',\n "proteins": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def read_sae_sets() -> dict[str, str]:
    """accession -> set ("train", "selection" or "report") from the committed SETS_FILE."""
    if not SETS_FILE.is_file():
        raise InputError(f"{SETS_FILE} is missing; regenerate it with `python scripts/demo_sets.py`")
    return {acc: name for acc, _rep, name in json.loads(SETS_FILE.read_text())["proteins"]}


def write_sae_fastas(workdir: Path) -> dict[str, Path]:
    """FASTAs of the SAE's train, selection and report proteins (SETS_FILE), in accession order."""
    sets = read_sae_sets()
    records = sae_corpus()
    if {a for a, _ in records} != set(sets):
        raise InputError(f"{SETS_FILE} does not list the demo's SAE corpus; regenerate it with "
                         f"`python scripts/demo_sets.py`")
    out = {}
    workdir.mkdir(parents=True, exist_ok=True)
    for name in SET_FRACTIONS:
        path = out[name] = workdir / f"sae_{name}.fasta"
        path.write_text("".join(f">{a}\n{q}\n" for a, q in records if sets[a] == name))
    return out


def _step(name: str, argv: list[str]) -> None:
    from .cli import main

    log.info("demo: plmscope %s", " ".join(argv))
    t0 = time.perf_counter()
    status = main(argv)
    if status:
        raise InputError(f"demo step `{name}` failed (exit status {status}); see the messages above")
    log.info("demo: %s took %.1f s", name, time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = write_corpus(work / "corpus.tsv", args.proteins)

    committed = committed_sae_dirs()
    if all(d.joinpath("cfg.json").exists() for d in committed) and not args.retrain_sae:
        sae_dirs = committed
    else:
        root = work / "sae"
        sae_dirs = [root / d.name for d in committed]
        fastas = write_sae_fastas(work)
        if not all(d.joinpath("cfg.json").exists() for d in sae_dirs) or args.retrain_sae:
            _step("train-sae", ["train-sae", *SAE_TRAIN_ARGS, "--fasta", str(fastas["train"]), "--out", str(root)])
            # the settings were chosen on "selection"; the numbers stored with each SAE come from "report"
            _step("eval-sae", ["eval-sae", "--sae", *map(str, sae_dirs), "--fasta", str(fastas["report"]),
                               "--set", "report", "--token-budget", "65536", "--loss-token-budget", "65536"])
    atlas = work / "atlas.duckdb"
    stamp = work / "atlas.stamp.json"
    # the schema version too: an atlas of an older plmscope is rebuilt, not served into its version error
    key = {"corpus": sha256_file(corpus), "saes": [sha256_file(d / "sae_weights.safetensors") for d in sae_dirs],
           "analyze": not args.no_analyze, "schema": SCHEMA_VERSION}
    if not atlas.exists() or not stamp.exists() or json.loads(stamp.read_text()) != key:
        stamp.unlink(missing_ok=True)
        _step(
            "build",
            [
                "build", "--corpus", str(corpus), *[x for d in sae_dirs for x in ("--sae", str(d))], "--out", str(atlas),
                "--structures", str(DATA / "structures"), "--manifest", str(DATA / "structures.tsv"),
                "--families", str(DATA / "pfam_families.tsv"),
                # the codes of every concept protein, which analyze reads (see below)
                "--concept-proteins", str(args.proteins),
            ],
        )
        if not args.no_analyze:
            # every annotated protein of the corpus goes into the concept association: with analyze's
            # default 1,000 the demo's concepts have too few regions per split to be tested
            _step("analyze", ["analyze", "--atlas", str(atlas), "--sweep", str(SWEEP_FILE),
                              "--max-proteins", str(args.proteins)])
        stamp.write_text(json.dumps(key))
    log.info("demo: atlas ready at %s after %.1f s", atlas, time.perf_counter() - t0)
    if args.no_serve:
        return 0
    _step("serve", ["serve", "--atlas", str(atlas), "--host", args.host, "--port", str(args.port)])
    return 0
