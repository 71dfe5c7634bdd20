"""Stage 1: corpus reading and the residue policy."""

import gzip

import pytest

from plmscope.errors import InputError
from plmscope.sequences import clean_sequence, parse_fasta_header, read_proteins

from tests._paths import DEMO


def write(tmp_path, name, text):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def test_uniprot_fasta_header_fields():
    info = parse_fasta_header("sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens OX=9606 GN=HBA1 PE=1 SV=2")
    assert info == {
        "accession": "P69905",
        "entry_name": "HBA_HUMAN",
        "protein_name": "Hemoglobin subunit alpha",
        "organism": "Homo sapiens",
    }
    assert parse_fasta_header("my_protein some words")["accession"] == "my_protein"


def test_policy_upper_cases_strips_stop_and_keeps_ambiguous_codes(tmp_path):
    path = write(tmp_path, "a.fasta", ">p1\nmkv\nLXB*\n>p2\nACDUOZ\n")
    corpus = read_proteins(path)
    assert [p.sequence for p in corpus.proteins] == ["MKVLXB", "ACDUOZ"]
    assert [p.nonstandard for p in corpus.proteins] == [2, 3]
    assert corpus.problems == []


@pytest.mark.parametrize(
    "seq, position, fragment",
    [("AC1DE", 3, "invalid residue '1'"), ("AC*DE", 3, "stop '*' inside"), ("ACJ", 3, "invalid residue 'J'")],
)
def test_invalid_residue_names_file_record_and_position(tmp_path, seq, position, fragment):
    path = write(tmp_path, "bad.fasta", f">good\nACDE\n>bad_one\n{seq}\n")
    corpus = read_proteins(path)
    assert [p.accession for p in corpus.proteins] == ["good"]
    (problem,) = corpus.problems
    assert problem.record == "bad_one" and problem.position == position and problem.reason == "invalid residue"
    message = str(problem)
    assert str(path) in message and "bad_one" in message and f"position {position}" in message and fragment in message
    with pytest.raises(InputError, match=rf"bad_one.*position {position}"):
        read_proteins(path, strict=True)


def test_empty_sequence_and_duplicate_accession_are_rejected(tmp_path):
    path = write(tmp_path, "d.fasta", ">a\nACD\n>b\n\n>a\nEEE\n")
    corpus = read_proteins(path)
    assert [p.accession for p in corpus.proteins] == ["a"]
    messages = sorted((p.reason, p.message) for p in corpus.problems)
    assert messages == [("duplicate accession", "duplicate accession; the first occurrence is kept"),
                        ("empty sequence", "empty sequence")]


def test_no_records_and_not_fasta_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no valid protein records"):
        read_proteins(write(tmp_path, "empty.fasta", ""))
    with pytest.raises(InputError, match="not a FASTA file"):
        read_proteins(write(tmp_path, "text.fasta", "hello\n"))
    with pytest.raises(InputError, match="cannot tell the format"):
        read_proteins(write(tmp_path, "x.docx", ">a\nAC\n"))
    with pytest.raises(InputError, match="no such file"):
        read_proteins(tmp_path / "missing.fasta")


def test_gzip_and_tsv_columns(tmp_path):
    path = write(tmp_path, "c.tsv.gz", "accession\tsequence\tlocation\nQ1\tMKV\tnucleus\nQ2\tAAA\t\n")
    corpus = read_proteins(path)
    assert [(p.accession, p.sequence, p.fields["location"]) for p in corpus.proteins] == [
        ("Q1", "MKV", "nucleus"),
        ("Q2", "AAA", ""),
    ]
    with pytest.raises(InputError, match=r"missing column\(s\) \['sequence'\]"):
        read_proteins(write(tmp_path, "n.tsv", "accession\tseq\nQ1\tMKV\n"))


def test_demo_table_carries_pfam_domains_as_1_based_annotations():
    corpus = read_proteins(DEMO / "proteins.tsv.gz", limit=50)
    with_pfam = [p for p in corpus.proteins if p.annotations]
    assert with_pfam
    for protein in with_pfam:
        for ann in protein.annotations:
            assert ann.kind == "pfam" and ann.label.startswith("PF")
            assert 1 <= ann.start <= ann.end <= protein.length


def test_uniprot_flat_file_features_are_1_based_inclusive():
    corpus = read_proteins(DEMO / "swissprot_sample.dat")
    assert len(corpus.proteins) == 100
    by_acc = {p.accession: p for p in corpus.proteins}
    # P15455 (CRU4_ARATH) starts with a 24-residue signal peptide: FT SIGNAL 1..24 in the file.
    protein = by_acc["P15455"]
    assert protein.organism.startswith("Arabidopsis thaliana")
    signal = [a for a in protein.annotations if a.type == "signal peptide"]
    assert [(a.start, a.end) for a in signal] == [(1, 24)]
    for p in corpus.proteins:
        for a in p.annotations:
            assert 1 <= a.start <= a.end <= p.length, (p.accession, a)


def test_clean_sequence_reports_first_bad_position_only():
    seq, problems = clean_sequence("AB-C.", file="f", record="r")
    assert seq is None and problems[0].position == 3


def test_annotations_column_is_read_and_bad_json_rejects_only_that_record(tmp_path):
    path = write(
        tmp_path,
        "ann.tsv",
        'accession\tsequence\tannotations\n'
        'A1\tMKVLA\t[{"kind": "nls", "type": "nuclear localization signal", "start": 2, "end": 4}]\n'
        "A2\tMKV\t[{oops\n",
    )
    corpus = read_proteins(path)
    (protein,) = corpus.proteins
    assert [(a.kind, a.type, a.start, a.end) for a in protein.annotations] == [("nls", "nuclear localization signal", 2, 4)]
    (problem,) = corpus.problems
    assert problem.record == "A2" and "annotations column" in problem.message
    assert problem.reason == "annotations column unreadable"
