"""`plmscope scan` through the real command line."""

from __future__ import annotations

import duckdb

from plmscope.cli import main

from .conftest import SEQ


def test_scan_command_writes_csv_and_parquet(tmp_path, esm_pair, tiny_inputs):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">A\n{SEQ[:20]}\n>B\n{SEQ[20:32]}\n")
    from tests.conftest import make_sae

    sae_dir = make_sae(tmp_path / "sae", tiny_inputs["plm"], layer=1, d_in=64, d_sae=128, k=8, seed=1)
    for out in (tmp_path / "scan.csv", tmp_path / "scan.parquet"):
        rc = main(["scan", "--sae", str(sae_dir), "--fasta", str(fasta), "--latents", "3,7", "--start", "2",
                   "--end", "4", "--device", "cpu", "--out", str(out)])
        assert rc == 0
        reader = "read_csv" if out.suffix == ".csv" else "read_parquet"
        t = duckdb.sql(f"SELECT record, latent, score FROM {reader}('{out}')").fetchall()
        assert len(t) == 2 * 3 * 19 * 2  # proteins x residues x substitutions x latents
        assert {r[0] for r in t} == {"A", "B"} and {r[1] for r in t} == {3, 7}
        assert all(r[2] is not None for r in t)
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # published atomically


def test_scan_command_bad_output(tmp_path, tiny_inputs, capsys):
    rc = main(["scan", "--sae", str(tiny_inputs["sae_dir"]), "--fasta", "x.fasta", "--latents", "1", "--out", str(tmp_path / "a.txt")])
    assert rc == 2 and ".csv or .parquet" in capsys.readouterr().err
