"""Structure reading and alignment-based mapping, checked against the demo's own residue map
(made independently with BLAST + the authors' scripts)."""

import csv
import gzip

import gemmi
import pytest

from tests.conftest import DEMO, demo_rows
from plmscope.atlas.structures import StructureJob, StructureRecord, find_structures, load_structure
from plmscope.sequences import Problem


@pytest.fixture(scope="module")
def seqs():
    return {r["accession"]: r["sequence"] for r in demo_rows() if r["has_structure"] == "true"}


def test_mapping_matches_demo_residue_map(seqs):
    with gzip.open(DEMO / "structure_residue_map.tsv.gz", "rt") as fh:
        ref = list(csv.DictReader(fh, delimiter="\t"))
    accs = ["O07529", "O09130", "P69905"]
    jobs, problems = find_structures(DEMO / "structures", DEMO / "structures.tsv", set(accs))
    assert not problems and len(jobs) == 3
    for job in jobs:
        rec = load_structure(job, seqs[job.accession])
        assert isinstance(rec, StructureRecord), rec
        assert rec.identity >= 95 and 0 < rec.coverage <= 100
        mine = {(auth, icode): pos for pos, auth, icode, _ in rec.residues}
        theirs = {(int(r["auth_seq_id"]), r["ins_code"].strip()): int(r["uniprot_pos"])
                  for r in ref if r["accession"] == job.accession and r["uniprot_pos"] not in ("", "NA", "None")}
        shared = set(mine) & set(theirs)
        assert len(shared) >= 0.9 * len(theirs)
        assert all(mine[k] == theirs[k] for k in shared)
        assert rec.content.startswith(("CRYST1", "ATOM", "HETATM", "MODEL"))
        assert gemmi.read_pdb_string(rec.content)[0][rec.chain]


def test_alphafold_name_gives_plddt_and_bad_files_are_problems(seqs, tmp_path):
    acc = "O07529"
    (job,), _ = find_structures(DEMO / "structures", DEMO / "structures.tsv", {acc})
    st = gemmi.read_structure(str(job.path))
    for res in st[0][job.chain]:
        for atom in res:
            atom.b_iso = 87.5
    af = tmp_path / f"AF-{acc}-F1-model_v4.pdb"
    st.write_pdb(str(af))
    (tmp_path / "AF-P69905-F1-model_v4.cif.gz").write_bytes(gzip.compress(b"data_broken\n_atom_site.id 1\nnonsense"))
    jobs, problems = find_structures(tmp_path, None, {acc, "P69905"})
    assert sorted(j.accession for j in jobs) == [acc, "P69905"] and not problems
    results = {j.accession: load_structure(j, seqs[j.accession]) for j in jobs}
    rec = results[acc]
    assert rec.is_prediction and rec.format == "pdb" and {r[3] for r in rec.residues} == {87.5}
    bad = results["P69905"]
    assert isinstance(bad, Problem) and "AF-P69905" in bad.file
    # a structure that belongs to another protein is refused, not mapped
    wrong = load_structure(StructureJob("X", job.path, job.chain, "", "line 2 (X)"), seqs["P69905"])
    assert isinstance(wrong, Problem) and "does not match" in wrong.message
