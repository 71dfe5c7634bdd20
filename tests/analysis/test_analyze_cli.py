import json

import duckdb

from plmscope.cli import main


def _check_tables(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        sae_id, d_sae = con.execute("SELECT sae_id, d_sae FROM saes").fetchall()[0]
        n, n_desc = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE description LIKE 'auto: %') FROM latent_analysis WHERE sae_id = ?", [sae_id]
        ).fetchall()[0]
        assert n == d_sae == n_desc
        # dead in the analysis <=> no activation anywhere
        bad = con.execute(
            "SELECT count(*) FROM latent_analysis a JOIN latents l USING (sae_id, latent) "
            "WHERE (a.pattern = 'dead') <> (l.is_dead OR l.max_act <= 0)"
        ).fetchall()[0][0]
        assert bad == 0
        # family metrics are probabilities; specific latents satisfy the rule
        bad = con.execute(
            "SELECT count(*) FROM latent_analysis WHERE family_specific AND (family_f1 < 0.5 OR family_precision < 0.7 OR family IS NULL)"
        ).fetchall()[0][0]
        assert bad == 0
        assert con.execute("SELECT count(*) FROM latent_concepts WHERE associated <> (test_f1 > 0.5)").fetchall()[0][0] == 0
        assert con.execute(
            "SELECT count(*) FROM latent_concepts WHERE threshold NOT IN (0, 0.15, 0.5, 0.6, 0.8)"
        ).fetchall()[0][0] == 0
        feats = {r[0]: r for r in con.execute("SELECT features, accuracy, macro_f1, n_train, n_test FROM probe_results").fetchall()}
        summary = json.loads(con.execute("SELECT summary FROM analysis_summary WHERE sae_id = ?", [sae_id]).fetchall()[0][0])
        return con.execute("SELECT count(*) FROM latent_concepts").fetchall()[0][0], feats, summary
    finally:
        con.close()


def test_analyze_fills_tables_and_rerun_replaces(mini_atlas, capsys):
    assert main(["analyze", "--atlas", str(mini_atlas), "--max-proteins", "40"]) == 0
    out = capsys.readouterr().out
    assert "family-specific" in out and "patterns:" in out and "probes" in out
    n_concepts, feats, summary = _check_tables(mini_atlas)
    assert set(summary) >= {"family", "patterns", "concepts", "probes", "timing_s"}
    assert sum(summary["patterns"].values()) == summary["d_sae"]
    if "skipped" not in summary["probes"]:
        assert set(feats) == {"sae_mean_max", "raw_mean"}
        assert feats["sae_mean_max"][3:] == feats["raw_mean"][3:]  # same split
    # re-running replaces, never duplicates
    assert main(["analyze", "--atlas", str(mini_atlas), "--max-proteins", "40"]) == 0
    assert _check_tables(mini_atlas)[0] == n_concepts
    con = duckdb.connect(str(mini_atlas), read_only=True)
    assert con.execute("SELECT count(*) FROM analysis_summary").fetchall()[0][0] == 1
    con.close()


def test_bad_inputs_are_user_errors(tmp_path, mini_atlas, capsys):
    assert main(["analyze", "--atlas", str(tmp_path / "missing.duckdb")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["analyze", "--atlas", str(mini_atlas), "--sae", "nope"]) == 2
    assert "has no SAE nope" in capsys.readouterr().err
    not_atlas = tmp_path / "x.duckdb"
    duckdb.connect(str(not_atlas)).close()
    before = not_atlas.read_bytes()
    assert main(["analyze", "--atlas", str(not_atlas)]) == 2
    assert "not a plmscope atlas" in capsys.readouterr().err
    assert not_atlas.read_bytes() == before  # failed run leaves the file untouched
    assert not list(tmp_path.glob("*.tmp"))


def test_analyze_on_the_shared_tiny_atlas(tiny_atlas, tmp_path, capsys):
    tiny = tiny_atlas
    import shutil
    from pathlib import Path

    src = Path(getattr(tiny, "path", tiny))
    path = tmp_path / "tiny.duckdb"
    shutil.copyfile(src, path)  # the session fixture is shared: analyse a copy
    assert main(["analyze", "--atlas", str(path), "--max-proteins", "50"]) == 0
    _check_tables(path)
