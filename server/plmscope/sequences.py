"""Stage 1 of the data path: read protein corpora and validate sequences.

Formats (chosen by file name; ``.gz`` allowed on all of them):

* FASTA (``.fa .fasta .faa .fas``) read with Biopython.  UniProt-style headers
  (``>sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens OX=9606 ...``) give accession,
  entry name, protein name and organism; any other header gives its first word as accession.
* TSV/CSV (``.tsv .csv``) with at least ``accession`` and ``sequence`` columns; optional
  ``entry_name``, ``protein_name``, ``organism``, ``pfam`` (JSON list of {pfam, name, start, end,
  score}, as in ``data/demo/proteins.tsv.gz``) and ``annotations`` (JSON list of {kind, type, label,
  start, end}); every other column is kept in ``Protein.fields``.
* UniProt flat files (``.dat .txt .swiss``) read with Biopython's ``swiss`` parser, including the
  feature table as per-residue annotations with 1-based inclusive ranges.

Residue policy (documented in the README and enforced here, one place only):

* lower case letters are upper-cased (accepted, no warning: many FASTA tools write lower case);
* one trailing ``*`` (a translation stop) is removed; a ``*`` anywhere else rejects the record;
* ``X B Z U O`` (unknown/ambiguous/rare amino acids, ``vocab.NONSTANDARD_AA``) are accepted: ESM-2
  and UniRep both have tokens for them; they are counted in ``Protein.nonstandard``;
* anything else (digits, ``-``, ``.``, ``J``, spaces inside a sequence...) rejects the record with a
  message naming the file, the record, the 1-based position and the character;
* empty sequences and duplicate accessions (second and later occurrences) are rejected.

Rejected records never stop a read: they are returned as ``Problem`` rows so that the atlas build
can count them; commands that need clean input (``train-sae``) call ``read_proteins(strict=True)``
which raises ``InputError`` with the first problem.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import InputError
from .vocab import ACCEPTED_AA, AMINO_ACIDS, FEATURE_NAMES, NONSTANDARD_AA, POINT_PAIR_FEATURES, SKIPPED_FEATURES

FASTA_SUFFIXES = {".fa", ".fasta", ".faa", ".fas", ".fna"}
TABLE_SUFFIXES = {".tsv", ".csv", ".tab"}
UNIPROT_SUFFIXES = {".dat", ".txt", ".swiss", ".sp"}

_UNIPROT_HEADER = re.compile(
    r"^(?:sp|tr)\|(?P<acc>[^|]+)\|(?P<entry>\S+)\s*(?P<name>.*?)(?:\s+OS=(?P<os>.*?))?"
    r"(?:\s+OX=\S+)?(?:\s+GN=\S+)?(?:\s+PE=\S+)?(?:\s+SV=\S+)?\s*$"
)


@dataclass
class Annotation:
    """A per-residue annotation on a protein: 1-based inclusive ``start``..``end``."""

    kind: str  # 'pfam' | 'feature' | 'nls' | ...
    type: str  # e.g. 'Pfam domain', 'signal peptide', 'transmembrane region'
    label: str  # family id or feature description
    start: int
    end: int
    name: str = ""
    score: float | None = None


@dataclass
class Protein:
    accession: str
    sequence: str
    entry_name: str = ""
    protein_name: str = ""
    organism: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # extra table columns, as text
    annotations: list[Annotation] = field(default_factory=list)
    nonstandard: int = 0
    source: str = ""  # "file:record-number" for messages

    @property
    def length(self) -> int:
        return len(self.sequence)


@dataclass
class Problem:
    """Why a record was rejected or changed; ``position`` is 1-based within the sequence.

    ``reason`` names the kind of problem in a few words (``"invalid residue"``,
    ``"empty sequence"`` ...): the atlas counts problems by it (``atlas_meta.skipped``), so it is
    set where the problem is found and ``message`` is free to say anything about the case."""

    file: str
    record: str
    message: str
    position: int | None = None
    severity: str = "error"  # 'error' = record rejected, 'warning' = record kept
    reason: str = field(kw_only=True)

    def __str__(self) -> str:
        where = f"{self.file}, record {self.record!r}"
        if self.position is not None:
            where += f", position {self.position}"
        return f"{where}: {self.message}"


@dataclass
class Corpus:
    proteins: list[Protein]
    problems: list[Problem]
    path: str


def clean_sequence(raw: str, *, file: str, record: str) -> tuple[str | None, list[Problem]]:
    """Apply the residue policy to one sequence; returns (sequence or None if rejected, problems)."""
    seq = "".join(raw.split()).upper()
    problems: list[Problem] = []
    if seq.endswith("*"):
        seq = seq[:-1]
    if not seq:
        return None, [Problem(file, record, "empty sequence", reason="empty sequence")]
    for i, ch in enumerate(seq, start=1):
        if ch not in ACCEPTED_AA:
            what = "a stop '*' inside the sequence" if ch == "*" else f"invalid residue {ch!r}"
            return None, [
                Problem(
                    file,
                    record,
                    f"{what}; allowed are the {len(AMINO_ACIDS)} standard amino acids and {' '.join(NONSTANDARD_AA)}",
                    position=i,
                    reason="invalid residue",
                )
            ]
    return seq, problems


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in FASTA_SUFFIXES:
        return "fasta"
    if last in TABLE_SUFFIXES:
        return "table"
    if last in UNIPROT_SUFFIXES:
        return "uniprot"
    raise InputError(
        f"{path}: cannot tell the format from the file name; use one of "
        f"{sorted(FASTA_SUFFIXES | TABLE_SUFFIXES | UNIPROT_SUFFIXES)} (optionally + .gz)"
    )


def parse_fasta_header(header: str) -> dict[str, str]:
    """Accession, entry name, protein name and organism from a FASTA description line."""
    m = _UNIPROT_HEADER.match(header.strip())
    if m:
        return {
            "accession": m.group("acc"),
            "entry_name": m.group("entry"),
            "protein_name": (m.group("name") or "").strip(),
            "organism": (m.group("os") or "").strip(),
        }
    first, _, rest = header.strip().partition(" ")
    return {"accession": first, "entry_name": "", "protein_name": rest.strip(), "organism": ""}


def _iter_fasta(path: Path) -> Iterator[tuple[str, dict, str]]:
    from Bio import SeqIO

    with _open_text(path) as handle:
        first = handle.read(1)
    if first and first != ">":
        raise InputError(f"{path}: not a FASTA file (first character is {first!r}, expected '>')")
    with _open_text(path) as handle:
        for n, rec in enumerate(SeqIO.parse(handle, "fasta"), start=1):
            info = parse_fasta_header(rec.description)
            yield info["accession"] or f"record{n}", info, str(rec.seq)


def _iter_table(path: Path) -> Iterator[tuple[str, dict, str]]:
    with _open_text(path) as handle:
        sample = handle.readline()
        delimiter = "\t" if "\t" in sample or path.name.lower().rstrip(".gz").endswith((".tsv", ".tab")) else ","
        reader = csv.DictReader(_chain_line(sample, handle), delimiter=delimiter)
        cols = reader.fieldnames or []
        missing = [c for c in ("accession", "sequence") if c not in cols]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; found {cols}")
        for n, row in enumerate(reader, start=2):
            acc = (row.get("accession") or "").strip()
            info = {k: (v or "") for k, v in row.items() if k not in ("sequence",) and k is not None}
            yield acc or f"line{n}", info, row.get("sequence") or ""


def _chain_line(first: str, rest: io.TextIOBase) -> Iterator[str]:
    yield first
    yield from rest


def _iter_uniprot(path: Path) -> Iterator[tuple[str, dict, str]]:
    from Bio import SeqIO

    with _open_text(path) as handle:
        try:
            for rec in SeqIO.parse(handle, "swiss"):
                desc = rec.description
                m = re.search(r"RecName: Full=([^;{]+)", desc)
                name = (m.group(1) if m else desc).strip()
                annotations = []
                for feat in rec.features:
                    if feat.type in SKIPPED_FEATURES or feat.location is None:
                        continue
                    try:
                        start = int(feat.location.start) + 1
                        end = int(feat.location.end)
                    except (TypeError, ValueError):  # fuzzy/unknown positions ('?')
                        continue
                    if feat.type in POINT_PAIR_FEATURES and end > start:
                        spans = [(start, start), (end, end)]
                    else:
                        spans = [(start, end)]
                    note = feat.qualifiers.get("note", "")
                    if isinstance(note, list):
                        note = "; ".join(note)
                    for s, e in spans:
                        annotations.append(
                            Annotation(
                                kind="feature",
                                type=FEATURE_NAMES.get(feat.type, feat.type.lower()),
                                label=str(note).split(";")[0].strip() or FEATURE_NAMES.get(feat.type, feat.type),
                                start=s,
                                end=e,
                            )
                        )
                info = {
                    "accession": rec.id,
                    "entry_name": rec.name,
                    "protein_name": name,
                    "organism": str(rec.annotations.get("organism", "")).rstrip("."),
                    "_annotations": annotations,
                }
                yield rec.id, info, str(rec.seq)
        except ValueError as exc:
            raise InputError(f"{path}: not a readable UniProt flat file: {exc}") from None


def _pfam_annotations(value: str) -> list[Annotation]:
    if not value:
        return []
    try:
        hits = json.loads(value)
    except json.JSONDecodeError:
        return []
    return [
        Annotation(
            kind="pfam",
            type="Pfam domain",
            label=h["pfam"],
            name=h.get("name", ""),
            start=int(h["start"]),
            end=int(h["end"]),
            score=h.get("score"),
        )
        for h in hits
    ]


def _json_annotations(value: str, file: str, record: str) -> list[Annotation]:
    """The optional ``annotations`` table column: a JSON list of Annotation fields."""
    if not value:
        return []
    try:
        items = json.loads(value)
        return [
            Annotation(
                kind=str(a.get("kind", "feature")),
                type=str(a["type"]),
                label=str(a.get("label", a["type"])),
                start=int(a["start"]),
                end=int(a["end"]),
                name=str(a.get("name", "")),
                score=a.get("score"),
            )
            for a in items
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{file}, record {record!r}: the annotations column is not a JSON list of "
                         f"{{type, start, end, ...}} objects ({exc})") from None


def iter_proteins(path: str | Path) -> Iterator[Protein | Problem]:
    """Yield a ``Protein`` per valid record and a ``Problem`` per rejected one, in file order."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a FASTA, TSV/CSV or UniProt flat file")
    fmt = detect_format(path)
    records = {"fasta": _iter_fasta, "table": _iter_table, "uniprot": _iter_uniprot}[fmt](path)
    seen: set[str] = set()
    fname = str(path)
    try:
        for n, (acc, info, raw) in enumerate(records, start=1):
            record = acc
            seq, problems = clean_sequence(raw, file=fname, record=record)
            yield from problems
            if seq is None:
                continue
            if acc in seen:
                yield Problem(fname, record, "duplicate accession; the first occurrence is kept",
                              reason="duplicate accession")
                continue
            seen.add(acc)
            info = dict(info)
            annotations = info.pop("_annotations", [])
            protein = Protein(
                accession=acc,
                sequence=seq,
                entry_name=info.pop("entry_name", "") or "",
                protein_name=info.pop("protein_name", "") or "",
                organism=info.pop("organism", "") or "",
                annotations=list(annotations),
                source=f"{fname}:{n}",
            )
            info.pop("accession", None)
            protein.annotations += _pfam_annotations(info.get("pfam", ""))
            try:
                protein.annotations += _json_annotations(info.pop("annotations", ""), fname, acc)
            except InputError as exc:
                seen.discard(acc)
                yield Problem(fname, record, str(exc).split(": ", 1)[-1], reason="annotations column unreadable")
                continue
            protein.fields = {k: v for k, v in info.items() if k not in ("length",)}
            protein.nonstandard = sum(seq.count(c) for c in NONSTANDARD_AA)
            yield protein
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from None


def read_proteins(path: str | Path, *, strict: bool = False, limit: int | None = None) -> Corpus:
    """Read a whole corpus.  ``strict`` raises ``InputError`` on the first rejected record."""
    proteins: list[Protein] = []
    problems: list[Problem] = []
    for item in iter_proteins(path):
        if isinstance(item, Problem):
            if strict and item.severity == "error":
                raise InputError(str(item))
            problems.append(item)
        else:
            proteins.append(item)
            if limit is not None and len(proteins) >= limit:
                break
    if not proteins:
        detail = f"; first problem: {problems[0]}" if problems else ""
        raise InputError(f"{path}: no valid protein records{detail}")
    return Corpus(proteins=proteins, problems=problems, path=str(path))
