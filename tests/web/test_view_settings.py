"""`plmscope view` (py3Dmol standalone HTML), `plmscope serve` argument handling and Settings."""

from __future__ import annotations

import argparse

import pytest

from plmscope.cli import main
from plmscope.settings import Settings
from plmscope.web import serve


def test_view_writes_standalone_html(client, tiny_atlas, tmp_path):
    hits = client.get("/proteins.json", params={"per_page": 500}).json()["proteins"]
    acc = next(h["accession"] for h in hits if h["has_structure"])
    p = client.get(f"/proteins/{acc}.json").json()
    latent = p["top_latents"][0]["latent"]
    out = tmp_path / "view.html"
    rc = main(["view", "--atlas", str(tiny_atlas.path), "--sae", p["sae_id"], "--latent", str(latent),
               "--accession", acc, "--out", str(out)])
    assert rc == 0
    html = out.read_text()
    assert "3Dmol-2.5.5.min.js" in html and "file://" in html and "cdn" not in html.lower()
    assert acc in html and f"latent {latent}" in html and "ATOM" in html


def test_view_errors_are_friendly(tiny_atlas, tmp_path, capsys):
    rc = main(["view", "--atlas", str(tiny_atlas.path), "--sae", "nope", "--latent", "0", "--accession", "X",
               "--out", str(tmp_path / "v.html")])
    assert rc == 2 and "no SAE 'nope'" in capsys.readouterr().err


def test_serve_arguments_become_settings(tmp_path):
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    s = serve.settings_from_args(p.parse_args(["--atlas", "a.duckdb", "--port", "9001", "--no-model", "--device", "cpu"]))
    assert s.port == 9001 and not s.load_model and s.device == "cpu" and str(s.atlas) == "a.duckdb"
    assert s.host == "127.0.0.1"  # loopback unless asked


def test_serve_missing_atlas_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--atlas", str(tmp_path / "missing.duckdb")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("PLMSCOPE_MAX_RESIDUES", "500")
    monkeypatch.setenv("PLMSCOPE_CORS_ORIGINS", '["https://lab.example"]')
    s = Settings()
    assert s.max_residues == 500 and s.cors_origins == ["https://lab.example"]
    assert (s.frontend_dir / "templates" / "base.html").exists()
    assert all(f.description for f in Settings.model_fields.values())  # every setting documented
    with pytest.raises(ValueError):
        Settings(device="tpu")


def test_serve_takes_the_atlas_from_the_environment_like_the_docker_images(tiny_atlas, monkeypatch):
    import argparse

    from plmscope.errors import AtlasError
    from plmscope.web import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    monkeypatch.delenv("PLMSCOPE_ATLAS", raising=False)
    with pytest.raises(AtlasError, match="pass --atlas FILE or set PLMSCOPE_ATLAS"):
        serve.settings_from_args(parser.parse_args([]))
    monkeypatch.setenv("PLMSCOPE_ATLAS", str(tiny_atlas.path))
    assert serve.settings_from_args(parser.parse_args(["--port", "8123"])).atlas == tiny_atlas.path
