"""The corpus side of a build: the usable proteins, cut into chunks, and each chunk's file.

Every pass over the corpus applies the same filters (``usable_proteins``), so chunk ``c`` holds
the same proteins in a scan, a resumed build and every shard.  A chunk file
(``chunk-<c>.json.gz`` in the build state) holds its protein rows, annotations, structures and
the problems met on the way, ready for the write phase.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from ..sequences import Problem, Protein, iter_proteins
from ..vocab import concept_key, concept_sample
from .settings import BuildSettings


def problem_record(p: Problem) -> dict:
    """A problem as stored in the build state (and, summed by reason, in ``atlas_meta.skipped``)."""
    return {"file": p.file, "record": p.record, "message": p.message, "position": p.position,
            "severity": p.severity, "reason": p.reason}


def usable_proteins(s: BuildSettings, max_residues: int | None, problems: list[Problem] | None) -> Iterator[Protein]:
    """The corpus' usable proteins in file order; the records left out (and pLM truncations) are
    appended to ``problems`` when it is a list."""
    corpus = str(s.corpus)
    n = 0
    for item in iter_proteins(s.corpus):
        if isinstance(item, Problem):
            if problems is not None:
                problems.append(item)
            continue
        if s.max_length and item.length > s.max_length:
            if problems is not None:
                problems.append(Problem(corpus, item.accession, f"{item.length} residues, longer than --max-length "
                                        f"{s.max_length}; skipped", reason="longer than --max-length"))
            continue
        if max_residues and item.length > max_residues and problems is not None:
            problems.append(Problem(corpus, item.accession, f"{item.length} residues; the pLM sees residues "
                                    f"1..{max_residues} (model limit)", severity="warning",
                                    reason="truncated at the pLM limit"))
        yield item
        n += 1
        if s.limit and n >= s.limit:
            return


def scan_corpus(s: BuildSettings, max_residues: int | None) -> tuple[int, list[Problem], list[str]]:
    """First pass: how many usable proteins, every problem, and the concept proteins whose residue
    codes the build keeps (``concept_code_proteins``).  Keeps no protein, so memory does not grow
    with the corpus (beyond the candidates' accessions); the build then streams it chunk by chunk
    (``iter_chunks``)."""
    problems: list[Problem] = []
    n, annotated, unannotated = 0, [], []
    for p in usable_proteins(s, max_residues, problems):
        n += 1
        if not s.concept_proteins:
            continue
        if any(concept_key(a.kind, a.type, a.label) for a in p.annotations):
            annotated.append(p.accession)
        elif s.structures or s.manifest:  # a concept protein if it has a structure
            unannotated.append(p.accession)
    if not n:
        first = f"; first problem: {problems[0]}" if problems else ""
        raise InputError(f"{s.corpus}: no usable protein records{first}")
    return n, problems, concept_code_proteins(s, annotated, unannotated)


def concept_code_proteins(s: BuildSettings, annotated: list[str], others: list[str]) -> list[str]:
    """The proteins whose residue codes the atlas keeps: ``vocab.concept_sample`` of the concept
    candidates, as analyze samples its concept proteins (the same seed-0 hash order), up to
    ``--concept-proteins``.  Candidates: proteins with an annotation that is a concept, and those
    with a structure (analyze finds secondary structure in it); Pfam hits that ``--pfam`` adds
    during the pass are not known yet, so analyze recomputes the codes of proteins that only they
    make concept proteins."""
    if not s.concept_proteins:
        return []
    with_structure = []
    if others:
        from .structures import find_structures

        jobs, _ = find_structures(s.structures, s.manifest, set(others))  # their problems: reported by the pass
        with_structure = sorted({j.accession for j in jobs})
    candidates = sorted(set(annotated) | set(with_structure))
    return [candidates[i] for i in concept_sample(candidates, s.concept_proteins)]


def chunk_sizes(n_usable: int, chunk_size: int) -> list[int]:
    return [min(chunk_size, n_usable - a) for a in range(0, n_usable, chunk_size)]


def iter_chunks(s: BuildSettings, max_residues: int | None, wanted: set[int]) -> Iterator[tuple[int, list[Protein]]]:
    """(chunk number, proteins) of the chunks in ``wanted``, in order: consecutive runs of
    ``--chunk-size`` usable proteins in file order; only one chunk is held at a time."""
    chunk: list[Protein] = []
    c = pos = 0
    last = max(wanted, default=-1)
    for p in usable_proteins(s, max_residues, None):
        if c > last:
            return
        if c in wanted:
            chunk.append(p)
        pos += 1
        if pos == s.chunk_size:
            if c in wanted:
                yield c, chunk
            chunk, c, pos = [], c + 1, 0
    if pos and c in wanted:
        yield c, chunk


def protein_row(p: Protein, max_residues: int | None) -> dict:
    fields = {k: v for k, v in p.fields.items() if k not in ("location", "pfam", "has_structure")}
    loc = p.fields.get("location", "") or ""
    return {
        "accession": p.accession, "entry_name": p.entry_name, "protein_name": p.protein_name, "organism": p.organism,
        "length": p.length, "sequence": p.sequence, "locations": [x.strip() for x in loc.split(";") if x.strip()],
        "families": sorted({a.label for a in p.annotations if a.kind == "pfam"}), "fields": fields,
        "truncated_to": max_residues if max_residues and p.length > max_residues else None,
        "annotations": [[a.kind, a.type, a.label, a.name, a.start, a.end, a.score] for a in p.annotations],
    }


def read_families(path: Path) -> dict[str, tuple[str, str]]:
    """``--families``: family id -> (name, description)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read families table ({exc})") from None
    key = "pfam" if rows and "pfam" in rows[0] else "family"
    if rows and key not in rows[0]:
        raise InputError(f"{path}: families table needs a 'pfam' (or 'family') column; found {list(rows[0])}")
    return {r[key]: (r.get("name") or "", r.get("description") or "") for r in rows}


def label_spans(chunk: list[Protein]) -> dict[str, list[tuple]]:
    """Per protein, the labelled residue ranges the aggregates count latents in: its Pfam families
    and its annotation types."""
    return {p.accession: [("family", a.label, a.start, a.end) for a in p.annotations if a.kind == "pfam"]
            + [("type", a.type, a.start, a.end) for a in p.annotations] for p in chunk}


def annotate_pfam(chunk: list[Protein], hmm_file: Path) -> dict[str, tuple[str, str]]:
    """``--pfam``: replace the chunk's own Pfam hits with hmmsearch's; returns the HMM file's
    family names (family id -> (name, description))."""
    from .pfam import annotate

    hits, families = annotate(chunk, hmm_file)
    for p in chunk:
        p.annotations = [a for a in p.annotations if a.kind != "pfam"] + hits.get(p.accession, [])
    return families


def write_chunk(root: Path, c: int, chunk: list[Protein], max_residues: int | None, s: BuildSettings,
                families: dict, pfam_families: dict) -> None:
    """Chunk ``c``'s protein rows, annotations, structures (+ their problems) as gzipped JSON."""
    rows = [protein_row(p, max_residues) for p in chunk]
    structures, problems = _structures(chunk, s) if s.structures or s.manifest else ([], [])
    fams = {}
    for p in chunk:
        for a in p.annotations:
            if a.kind == "pfam":
                name, desc = families.get(a.label) or pfam_families.get(a.label) or (a.name, "")
                fams[a.label] = [name or a.name, desc]
    data = {"proteins": rows, "structures": structures, "families": fams,
            "problems": [problem_record(p) for p in problems]}
    tmp = root / f"chunk-{c:06d}.json.gz.tmp"
    with gzip.open(tmp, "wt") as fh:
        json.dump(data, fh)
    tmp.replace(chunk_path(root, c))


def chunk_path(root: Path, c: int) -> Path:
    return root / f"chunk-{c:06d}.json.gz"


def _structures(chunk: list[Protein], s: BuildSettings) -> tuple[list[dict], list[Problem]]:
    from .structures import StructureRecord, find_structures, load_structure

    seqs = {p.accession: p.sequence for p in chunk}
    structures = []
    jobs, problems = find_structures(s.structures, s.manifest, set(seqs))
    for job in jobs:
        rec = load_structure(job, seqs[job.accession])
        if isinstance(rec, StructureRecord):
            structures.append(rec.__dict__)
        else:
            problems.append(rec)
    return structures, problems
