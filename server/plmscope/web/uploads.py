"""Structure files uploaded on /infer: parsed in memory with gemmi, never written to disk.

The chain that best matches the pasted sequence is kept and mapped residue by residue onto
1-based sequence positions (gemmi's global alignment), so the activation colouring lands on the
right residues even when the structure covers only part of the sequence or numbers it its own way.
"""

from __future__ import annotations

import gzip
import io
import re

import gemmi

from ..errors import InputError

_PREDICTED = re.compile(rb"ALPHAFOLD|ESMFOLD|COLABFOLD|PREDICTED MODEL|_ma_qa_metric", re.IGNORECASE)


def _decompress(data: bytes, cap: int) -> bytes:
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            out = fh.read(cap + 1)  # bounded: a small .gz must not expand into gigabytes
    except OSError as exc:
        raise InputError(f"the uploaded file looks gzip-compressed but cannot be read: {exc}") from None
    if len(out) > cap:
        raise InputError(f"the uploaded structure is larger than {cap:,} bytes once decompressed")
    return out


def _one_letter(res: gemmi.Residue) -> str:
    info = gemmi.find_tabulated_residue(res.name)
    code = info.one_letter_code.upper() if info is not None else "X"
    return code if code.isalpha() else "X"


def parse_structure_upload(data: bytes, filename: str, sequence: str, cap: int) -> dict:
    """Uploaded PDB/mmCIF bytes -> a structure dict shaped like ``api_models.Structure``."""
    if not data:
        raise InputError("the uploaded structure file is empty")
    if len(data) > cap:
        raise InputError(f"the uploaded structure has {len(data):,} bytes; the limit is {cap:,}")
    text = _decompress(data, cap)
    name = filename.lower().removesuffix(".gz")
    is_cif = name.endswith((".cif", ".mmcif")) or text.lstrip()[:5] == b"data_"
    fmt = gemmi.CoorFormat.Mmcif if is_cif else gemmi.CoorFormat.Pdb
    try:
        st = gemmi.read_structure_string(text, format=fmt)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with a line number
        raise InputError(f"cannot read the uploaded {'mmCIF' if is_cif else 'PDB'} file: {exc}") from None
    if len(st) == 0:
        raise InputError("the uploaded structure has no model")
    st.remove_hydrogens()
    model = st[0]
    best = None
    for chain in model:
        residues = [r for r in chain if r.het_flag == "A" or gemmi.find_tabulated_residue(r.name) is not None
                    and gemmi.find_tabulated_residue(r.name).is_amino_acid()]
        if not residues:
            continue
        letters = [_one_letter(r) for r in residues]
        aln = gemmi.align_string_sequences(letters, list(sequence), [])
        if best is None or aln.match_count > best[0]:
            best = (aln.match_count, chain.name, residues, aln)
    if best is None or best[0] == 0:
        raise InputError("no protein chain of the uploaded structure matches the sequence")
    _, chain_name, residues, aln = best
    mapping = _map(aln.cigar_str(), len(residues))
    seq_pos, auth, icode, plddt = [], [], [], []
    predicted = bool(_PREDICTED.search(text[:20000]))
    for i, r in enumerate(residues):
        j = mapping[i]
        if j is None:
            continue
        seq_pos.append(j + 1)
        auth.append(r.seqid.num)
        icode.append(r.seqid.icode.strip())
        ca = r.find_atom("CA", "*")
        plddt.append(round(ca.b_iso, 2) if ca is not None else None)
    # Keep only the matched chain of model 1: what 3Dmol needs, and nothing of the rest of the file.
    for other in [c.name for c in model if c.name != chain_name]:
        model.remove_chain(other)
    while len(st) > 1:
        del st[1]
    identical = sum(1 for i, r in enumerate(residues) if mapping[i] is not None and _one_letter(r) == sequence[mapping[i]])
    return {
        "structure_id": f"upload:{chain_name}",
        "file_name": re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:100] or "upload",
        "chain": chain_name,
        "format": "mmcif" if is_cif else "pdb",
        "is_prediction": predicted,
        "identity": round(100.0 * identical / max(len(seq_pos), 1), 2),
        "coverage": round(100.0 * len(seq_pos) / max(len(sequence), 1), 2),
        "source": "uploaded",
        "content": st.make_pdb_string(),
        "residues": {"seq_pos": seq_pos, "auth_seq_id": auth, "ins_code": icode, "plddt": plddt if predicted else None},
    }


def _map(cigar: str, n_query: int) -> list[int | None]:
    """Query (structure residue) index -> target (sequence) index from a CIGAR (I = query only, D = target only)."""
    out: list[int | None] = [None] * n_query
    qi = ti = 0
    for count, op in re.findall(r"(\d+)([MID])", cigar):
        for _ in range(int(count)):
            if op == "M":
                out[qi] = ti
                qi += 1
                ti += 1
            elif op == "I":
                qi += 1
            else:
                ti += 1
    return out
