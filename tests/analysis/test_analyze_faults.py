"""`plmscope analyze` killed (SIGKILL) at each step of its publish, then rerun; and a server that
keeps answering while analyze republishes the atlas it serves."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from plmscope.cli import main
from plmscope.settings import Settings
from plmscope.web.app import create_app

from tests._kill import MAIN, mode, plain_mode, run_killed, sha
from tests.analysis.test_analyze_cli import _rows

ARGS = ["--max-proteins", "0"]  # concepts skipped: the publish path is the same, the run shorter
POINTS = ["analyze:analysed:1", "publish:before-rename:1", "publish:renamed:1"]


@pytest.fixture(scope="module")
def analyze_reference(mini_atlas, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze_faults")
    old, ref = root / "old.duckdb", root / "reference.duckdb"
    shutil.copyfile(mini_atlas, old)
    shutil.copyfile(mini_atlas, ref)
    assert main(["analyze", "--atlas", str(ref), *ARGS]) == 0
    return old, ref


@pytest.mark.parametrize("point", POINTS)
def test_analyze_killed_then_rerun(analyze_reference, tmp_path, point):
    old, ref = analyze_reference
    d = tmp_path / "atlas"
    d.mkdir()
    path = d / "atlas.duckdb"
    shutil.copyfile(old, path)
    run_killed(["analyze", "--atlas", str(path), *ARGS], point)
    if point != "publish:renamed:1":
        assert sha(path) == sha(old)
    assert main(["analyze", "--atlas", str(path), *ARGS]) == 0  # starts over; removes the killed run's temp
    assert _rows(path) == _rows(ref)
    assert sorted(p.name for p in d.iterdir()) == ["atlas.duckdb"]
    assert mode(path) == plain_mode()  # not mkstemp's 0600: a server running as another user reads it


def test_server_keeps_answering_while_analyze_republishes(analyze_reference, tmp_path):
    old, _ = analyze_reference
    path = tmp_path / "served.duckdb"
    shutil.copyfile(old, path)
    with TestClient(create_app(Settings(atlas=path, load_model=False))) as client:
        first = client.get("/analysis.json")
        assert first.status_code == 200
        proc = subprocess.Popen([sys.executable, "-c", MAIN, "analyze", "--atlas", str(path), *ARGS],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        n = 0
        while proc.poll() is None or n < 3:
            r = client.get("/analysis.json")  # the server's connection still reads the old file
            assert r.status_code == 200 and r.json() == first.json()
            n += 1
            time.sleep(0.05)
        assert proc.wait() == 0, proc.stderr.read()[-2000:]
        assert n > 3
    # a server started now sees the new analysis
    with TestClient(create_app(Settings(atlas=path, load_model=False))) as client:
        assert client.get("/analysis.json").json() != first.json()
