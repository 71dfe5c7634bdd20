"""Structures for the atlas: PDB/mmCIF (gzip allowed) read with gemmi, mapped to the protein
sequence by alignment (Biopython ``PairwiseAligner``: local, BLOSUM62, gap -11/-1), never by
trusting residue numbers.

Where files come from:

* a manifest TSV with columns ``accession``, ``file`` and optionally ``chain`` (the demo's
  ``structures.tsv`` works as is); ``file`` is resolved relative to the manifest's directory, then
  to the structures directory, then as a bare name inside the structures directory;
* otherwise AlphaFold-style names in the structures directory: ``AF-<accession>-F1-model_v4.pdb``
  (or ``.cif``, optionally ``.gz``); these are predictions, so B-factors are stored as pLDDT.

Acceptance: a chain matches its protein when identity (identical / aligned residue pairs) is at
least ``MIN_IDENTITY`` percent over at least ``MIN_ALIGNED`` pairs.  Anything else (unreadable file,
no protein chain, mismatch, manifest naming a missing file) becomes a ``Problem`` with the file and
the record, never an exception.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..sequences import Problem

MIN_IDENTITY = 90.0
MIN_ALIGNED = 20
AF_NAME = re.compile(r"^AF-(?P<acc>[A-Za-z0-9_.-]+?)-F\d+-model_v\d+\.(?:pdb|cif)(?:\.gz)?$")


@dataclass
class StructureRecord:
    structure_id: str
    accession: str
    file_name: str
    chain: str
    format: str
    is_prediction: bool
    identity: float
    coverage: float
    source: str
    content: str
    residues: list[tuple[int, int, str, float | None]] = field(default_factory=list)  # seq_pos, auth, icode, plddt


@dataclass
class StructureJob:
    accession: str
    path: Path
    chain: str | None
    source: str
    record: str  # manifest line, for messages


def find_structures(directory: str | Path | None, manifest: str | Path | None,
                    accessions: set[str]) -> tuple[list[StructureJob], list[Problem]]:
    """Structure files for the given accessions (manifest rows for other accessions are ignored)."""
    jobs: list[StructureJob] = []
    problems: list[Problem] = []
    directory = Path(directory) if directory else None
    if manifest:
        manifest = Path(manifest)
        try:
            with open(manifest, newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            return [], [Problem(str(manifest), "-", f"cannot read structure manifest ({exc})",
                            reason="structure manifest unreadable")]
        if rows and not {"accession", "file"} <= set(rows[0]):
            return [], [Problem(str(manifest), "line 1", f"manifest needs columns accession, file; found {list(rows[0])}",
                                 reason="manifest needs columns accession, file")]
        for n, row in enumerate(rows, start=2):
            acc = (row.get("accession") or "").strip()
            if acc not in accessions:
                continue
            name = (row.get("file") or "").strip()
            candidates = [manifest.parent / name]
            if directory:
                candidates += [directory / name, directory / Path(name).name]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                problems.append(Problem(str(manifest), f"line {n} ({acc})", f"structure file {name!r} not found",
                                        reason="structure file missing"))
                continue
            chain = (row.get("chain") or "").strip() or None
            jobs.append(StructureJob(acc, path, chain, (row.get("source_package") or "").strip(), f"line {n} ({acc})"))
    elif directory:
        if not directory.is_dir():
            return [], [Problem(str(directory), "-", "structures directory does not exist",
                                 reason="structures directory does not exist")]
        for path in sorted(directory.iterdir()):
            m = AF_NAME.match(path.name)
            if m and m.group("acc") in accessions:
                jobs.append(StructureJob(m.group("acc"), path, None, "AlphaFold DB", path.name))
    return jobs, problems


def _chain_sequence(chain) -> tuple[str, list]:
    import gemmi

    seq, residues = [], []
    for res in chain.get_polymer():
        info = gemmi.find_tabulated_residue(res.name)
        code = info.one_letter_code.upper() if info is not None and info.is_amino_acid() else "X"
        seq.append(code if code.isalpha() and code != "?" else "X")
        residues.append(res)
    return "".join(seq), residues


def _aligner():
    from Bio import Align
    from Bio.Align import substitution_matrices

    al = Align.PairwiseAligner()
    al.mode = "local"
    al.substitution_matrix = substitution_matrices.load("BLOSUM62")
    al.open_gap_score = -11
    al.extend_gap_score = -1
    return al


_ALIGNER = None


def align_chain(protein_seq: str, chain_seq: str) -> tuple[list[tuple[int, int]], float]:
    """Aligned (protein index, chain index) pairs (0-based) and identity in percent."""
    global _ALIGNER
    if _ALIGNER is None:
        _ALIGNER = _aligner()
    # letters the substitution matrix has no row for (U, O, gaps) align as unknown
    scored = set(_ALIGNER.substitution_matrix.alphabet) - {"*"}
    clean = "".join(c if c in scored else "X" for c in chain_seq)
    prot = "".join(c if c in scored else "X" for c in protein_seq)
    aln = _ALIGNER.align(prot, clean)[0]
    pairs = []
    for (a0, a1), (b0, b1) in zip(*aln.aligned):
        pairs.extend(zip(range(a0, a1), range(b0, b1)))
    same = sum(1 for i, j in pairs if prot[i] == clean[j])
    return pairs, (100.0 * same / len(pairs) if pairs else 0.0)


def load_structure(job: StructureJob, sequence: str) -> StructureRecord | Problem:
    import gemmi

    fname = str(job.path)
    try:
        st = gemmi.read_structure(fname)
    except (RuntimeError, ValueError, OSError) as exc:
        # Old PDB files often carry junk in columns 73-80 (segment id / element / charge);
        # the coordinates end at column 54, so retry with those columns cut off.
        st = None
        if not re.search(r"\.(cif|mmcif)(\.gz)?$", job.path.name, re.I):
            try:
                st = gemmi.read_pdb(fname, max_line_length=72)
            except (RuntimeError, ValueError, OSError):
                st = None
        if st is None:
            return Problem(fname, job.record, f"corrupt or unreadable structure file ({str(exc)[:200]})",
                           reason="structure file corrupt")
    st.setup_entities()
    if len(st) == 0:
        return Problem(fname, job.record, "structure file has no model", reason="structure file has no model")
    model = st[0]
    chains = [c for c in model if (job.chain is None or c.name == job.chain)]
    if job.chain is not None and not chains:
        return Problem(fname, job.record, f"chain {job.chain!r} not in the file (chains: {[c.name for c in model]})",
                       reason="structure chain missing")
    best = None
    for ch in chains:
        cseq, residues = _chain_sequence(ch)
        if len(cseq) < 1:
            continue
        pairs, ident = align_chain(sequence, cseq)
        if best is None or (len(pairs) * ident) > (len(best[2]) * best[3]):
            best = (ch, residues, pairs, ident)
    if best is None:
        return Problem(fname, job.record, "no protein chain in the structure", reason="structure has no protein chain")
    ch, residues, pairs, ident = best
    if ident < MIN_IDENTITY or len(pairs) < MIN_ALIGNED:
        return Problem(fname, job.record, f"chain {ch.name} does not match the protein sequence "
                       f"(identity {ident:.1f}% over {len(pairs)} aligned residues; need >= {MIN_IDENTITY}% "
                       f"over >= {MIN_ALIGNED})", reason="structure does not match protein")
    is_pred = bool(AF_NAME.match(job.path.name))
    rows = []
    for i, j in pairs:
        res = residues[j]
        plddt = None
        if is_pred and len(res):
            atom = res.find_atom("CA", "*") or res[0]
            plddt = float(atom.b_iso)
        rows.append((i + 1, int(res.seqid.num), res.seqid.icode.strip(), plddt))
    # the chain as PDB text of model 1, for 3Dmol
    out = gemmi.Structure()
    out.cell = st.cell
    m = gemmi.Model(1) if _model_takes_int() else gemmi.Model("1")
    m.add_chain(ch)
    out.add_model(m)
    out.setup_entities()
    content = out.make_pdb_string(gemmi.PdbWriteOptions(minimal=True))
    stem = re.sub(r"\.(pdb|cif|ent|mmcif)$", "", job.path.name.removesuffix(".gz"), flags=re.I)
    fmt = "mmcif" if re.search(r"\.(cif|mmcif)(\.gz)?$", job.path.name, re.I) else "pdb"
    return StructureRecord(
        structure_id=f"{job.accession}:{stem}:{ch.name}", accession=job.accession, file_name=job.path.name,
        chain=ch.name, format=fmt, is_prediction=is_pred, identity=round(ident, 2),
        coverage=round(100.0 * len(pairs) / max(len(sequence), 1), 2), source=job.source, content=content,
        residues=rows,
    )


def _model_takes_int() -> bool:
    import gemmi

    try:
        gemmi.Model(1)
        return True
    except TypeError:
        return False
