"""Fault injection: `plmscope build` and `plmscope merge` killed (SIGKILL) at many points, then
rerun.  Each time: the previous atlas is byte-identical and opens, the rerun (``--resume``)
completes, the atlas equals an uninterrupted build table by table, and nothing temporary is left.
Also: a file-size limit hit while writing the atlas (disk full) gives a clear error and leaves the
old atlas, and published atlases get a plain file's mode."""

from __future__ import annotations

import resource
import shutil
import signal

import duckdb
import pytest

from plmscope.cli import main
from plmscope.store.reader import read_existing_meta

from tests._kill import mode, plain_mode, run_cli, run_killed, sha
from tests.atlas.test_build import TABLES, table_rows
from tests.conftest import make_sae

# (point:n, what the build was doing).  The tiny corpus is 5 chunks of 16 proteins; with
# --checkpoint-every 0 each chunk ends with a checkpoint.
BUILD_POINTS = [
    ("state:before-rename:1", "first state.json being renamed into place (no state yet)"),
    ("build:state-opened:1", "state opened, no chunk done, no checkpoint (issue 20's traceback)"),
    ("chunk:written:1", "first chunk file written, its forward not started (before any checkpoint)"),
    ("spill:before-rename:1", "first spill part written under its temporary name"),
    ("checkpoint:saved:1", "first checkpoint directory written, state.json not yet pointing at it"),
    ("state:before-rename:2", "first checkpoint's state.json being renamed"),
    ("checkpoint:switched:2", "second checkpoint switched, the first not yet removed"),
    ("chunk:written:4", "mid-pass: three chunks checkpointed, the fourth started"),
    ("spill:before-rename:4", "a later spill part written under its temporary name"),
    ("build:streamed:1", "pass finished, write phase not started"),
    ("write:chunks:1", "write phase: proteins written to the temporary atlas"),
    ("write:closed:1", "temporary atlas complete and closed, not published"),
    ("publish:before-rename:1", "publish: temporary atlas fsynced, not renamed"),
    ("publish:renamed:1", "publish: atlas renamed into place, directory not fsynced, state not removed"),
    ("build:published:1", "atlas published, build state not removed"),
]


@pytest.fixture(scope="module")
def faults_setup(tiny_atlas, tmp_path_factory):
    """An SAE to add to a copy of the tiny atlas, and the atlas an uninterrupted build makes."""
    root = tmp_path_factory.mktemp("faults")
    sae = make_sae(root / "sae64", tiny_atlas.plm, d_sae=64, k=4, seed=1)
    args = [a if a != str(tiny_atlas.sae_dir) else str(sae) for a in tiny_atlas.build_args]
    reference = root / "reference.duckdb"
    shutil.copyfile(tiny_atlas.path, reference)
    assert main(["build", *args, "--out", str(reference)]) == 0
    sae_id = _sae_ids(reference)[1]
    return {"args": args, "reference": reference, "sae_id": sae_id, "old": tiny_atlas.path}


def _sae_ids(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT sae_id FROM saes ORDER BY position").fetchall()]
    finally:
        con.close()


def _same_as_reference(out, setup):
    for t in TABLES:
        assert table_rows(out, t, setup["sae_id"]) == table_rows(setup["reference"], t, setup["sae_id"]), t


@pytest.mark.parametrize("point", [p for p, _ in BUILD_POINTS], ids=[p for p, _ in BUILD_POINTS])
def test_build_killed_then_resumed(faults_setup, tmp_path, point, caplog):
    d = tmp_path / "atlas"
    d.mkdir()
    out = d / "atlas.duckdb"
    shutil.copyfile(faults_setup["old"], out)
    before = sha(out)
    run_killed(["build", *faults_setup["args"], "--out", str(out)], point)
    if point not in ("publish:renamed:1", "build:published:1"):  # before those, the old atlas stands
        assert sha(out) == before
    assert len(read_existing_meta(out)["_sae_ids"]) >= 1  # it opens
    assert main(["build", *faults_setup["args"], "--out", str(out), "--resume"]) == 0
    _same_as_reference(out, faults_setup)
    assert sorted(p.name for p in d.iterdir()) == ["atlas.duckdb"]  # no temporary file, no state
    assert mode(out) == plain_mode()


def test_kill_before_the_first_timed_checkpoint_starts_over_with_a_message(faults_setup, tmp_path, caplog):
    out = tmp_path / "atlas.duckdb"
    args = [*faults_setup["args"], "--checkpoint-every", "3600"]  # later flag wins: no checkpoint before the end
    run_killed(["build", *args, "--out", str(out)], "chunk:written:4")
    state = tmp_path / "atlas.duckdb.build-state"
    assert (state / "state.json").is_file() and not out.exists()
    with caplog.at_level("WARNING"):
        assert main(["build", *args, "--out", str(out), "--resume"]) == 0
    assert "has no checkpoint yet" in caplog.text and "starting from the first chunk" in caplog.text
    assert table_rows(out, "latents", faults_setup["sae_id"]) == table_rows(faults_setup["reference"], "latents",
                                                                           faults_setup["sae_id"])
    assert not state.exists()


MERGE_POINTS = ["write:chunks:1", "write:closed:1", "publish:before-rename:1", "publish:renamed:1"]


@pytest.fixture(scope="module")
def shard_states(faults_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    states = []
    for i in range(2):
        st = root / f"st{i}"
        assert main(["build", *faults_setup["args"], "--shard", f"{i}/2", "--state-out", str(st)]) == 0
        states.append(st)
    return states


@pytest.mark.parametrize("point", MERGE_POINTS)
def test_merge_killed_then_rerun(faults_setup, shard_states, tmp_path, point):
    d = tmp_path / "atlas"
    d.mkdir()
    out = d / "atlas.duckdb"
    shutil.copyfile(faults_setup["old"], out)
    before = sha(out)
    states = {st: sha(st / "state.json") for st in shard_states}
    argv = ["merge", "--state", str(shard_states[0]), "--state", str(shard_states[1]), "--out", str(out)]
    run_killed(argv, point)
    if point != "publish:renamed:1":
        assert sha(out) == before
    assert {st: sha(st / "state.json") for st in shard_states} == states  # the shard states are inputs
    assert main(argv) == 0
    _same_as_reference(out, faults_setup)
    assert sorted(p.name for p in d.iterdir()) == ["atlas.duckdb"]
    assert mode(out) == plain_mode()


def _file_size_limit(limit: int):
    def preexec():
        # the default action of SIGXFSZ kills the process; ignored, the write fails with EFBIG,
        # which is what a full disk (ENOSPC) looks like to plmscope
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_disk_full_while_writing_the_atlas_keeps_the_old_one(faults_setup, tmp_path):
    """No tmpfs can be mounted without root here: a file size limit (RLIMIT_FSIZE) stands in for a
    full disk; the copy of the old atlas fits, the atlas with the new SAE does not."""
    d = tmp_path / "atlas"
    d.mkdir()
    out = d / "atlas.duckdb"
    shutil.copyfile(faults_setup["old"], out)
    before = sha(out)
    proc = run_cli(["build", *faults_setup["args"], "--out", str(out)],
                   preexec_fn=_file_size_limit(out.stat().st_size + 4096))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "writing the atlas failed" in proc.stderr and "File too large" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sha(out) == before
    assert sorted(p.name for p in d.iterdir()) == ["atlas.duckdb", "atlas.duckdb.build-state"]
    # space freed: the same command with --resume finishes from the kept state
    assert main(["build", *faults_setup["args"], "--out", str(out), "--resume"]) == 0
    _same_as_reference(out, faults_setup)
    assert sorted(p.name for p in d.iterdir()) == ["atlas.duckdb"]
