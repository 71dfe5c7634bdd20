"""`plmscope build --ray` on a local Ray cluster of 2 CPUs: the atlas equals the single-process
build table by table, also when a worker is killed mid-shard (Ray retries it, the retry resumes
the shard's checkpoint); rejected records are reported as a single-process build reports them; a
shard that fails names itself and the error; ``--resume`` skips finished shards."""

from __future__ import annotations

import json

import duckdb
import pytest

from plmscope.cli import main

from tests._kill import run_killed
from tests.atlas.test_build import TABLES, table_rows

ray = pytest.importorskip("ray", reason="Ray is not installed (the optional extra: pip install 'plmscope[ray]')")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2, configure_logging=False)
    yield
    ray.shutdown()


def meta(path, key):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = ?", [key]).fetchone()[0])
    finally:
        con.close()


def same_tables(out, reference):
    for t in TABLES:
        assert table_rows(out, t) == table_rows(reference, t), t


def test_ray_build_equals_one_process(tiny_atlas, cluster, tmp_path, capsys):
    out = tmp_path / "ray.duckdb"
    argv = ["build", *tiny_atlas.build_args, "--out", str(out), "--ray", "--ray-workers", "2", "--ray-shards", "3"]
    assert main(argv) == 0
    same_tables(out, tiny_atlas.path)
    # the rejected records (invalid residue, empty, duplicate, structure problems) counted once, as one process does
    assert meta(out, "skipped") == meta(tiny_atlas.path, "skipped")
    assert meta(out, "skipped")["invalid residue"]["examples"][0]["record"] == "BAD_RESIDUE"
    summary = meta(out, "summary")
    assert [s["shard"] for s in summary["shards"]] == ["0/3", "1/3", "2/3"]
    assert sum(s["proteins"] for s in summary["shards"]) == summary["n_proteins"]
    assert all(s["seconds"] > 0 and not s["resumed"] for s in summary["shards"])
    provenance = meta(out, "ray")
    assert provenance["shards"] == 3 and provenance["workers"] == 2 and provenance["per_worker"] == {"num_cpus": 1}
    assert provenance["cluster"]["CPU"] == 2 and provenance["ray_version"] == ray.__version__
    printed = capsys.readouterr().out
    assert "shard 2/3:" in printed and "plmscope build: wrote" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ray.duckdb"]  # shard states removed


def test_killed_worker_is_retried_and_the_atlas_is_the_same(tiny_atlas, cluster, tmp_path, monkeypatch):
    # the first worker to write its second chunk SIGKILLs itself (after its first checkpoint);
    # the marker file makes the retry run through
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("PLMSCOPE_FAULT", "chunk:written:2")
    monkeypatch.setenv("PLMSCOPE_FAULT_ONCE", str(marker))
    out = tmp_path / "ray.duckdb"
    assert main(["build", *tiny_atlas.build_args, "--out", str(out), "--ray", "--ray-shards", "2"]) == 0
    assert marker.exists()  # a worker really died
    same_tables(out, tiny_atlas.path)
    shards = meta(out, "summary")["shards"]
    assert sorted(s["resumed"] for s in shards) == [False, True]  # the retry resumed its checkpoint


def test_a_failing_shard_names_itself_and_the_records(tiny_atlas, cluster, tmp_path, capsys):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">A\nMK1V\n>B\n\n")
    out = tmp_path / "x.duckdb"
    rc = main(["build", "--corpus", str(bad), "--sae", str(tiny_atlas.sae_dir), "--out", str(out), "--device", "cpu",
               "--ray", "--ray-shards", "2", "--ray-workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "shard 0/2: " in err and "no usable protein records" in err and "record 'A'" in err


def test_resume_skips_finished_shards(tiny_atlas, cluster, tmp_path, capsys):
    out = tmp_path / "ray.duckdb"
    argv = ["build", *tiny_atlas.build_args, "--out", str(out), "--ray", "--ray-shards", "2"]
    # the driver killed once every shard is built, before the merge: the states stay
    run_killed(argv, "build:streamed:1")
    states = sorted(p.name for p in (tmp_path / "ray.duckdb.ray-state").iterdir())
    assert states == ["shard-0000-of-0002", "shard-0001-of-0002"] and not out.exists()
    assert main([*argv, "--resume"]) == 0
    same_tables(out, tiny_atlas.path)
    assert [s.get("skipped") for s in meta(out, "summary")["shards"]] == [True, True]
    assert "skipped (done before --resume)" in capsys.readouterr().out


def test_ray_flags_refused_with_shard(tiny_atlas, tmp_path, capsys):
    rc = main(["build", *tiny_atlas.build_args, "--state-out", str(tmp_path / "st"), "--shard", "0/2", "--ray"])
    assert rc == 2 and "--ray shards the build itself" in capsys.readouterr().err
    rc = main(["build", *tiny_atlas.build_args, "--out", str(tmp_path / "a.duckdb"), "--ray", "--ray-workers", "0"])
    assert rc == 2 and "--ray-workers must be at least 1" in capsys.readouterr().err
