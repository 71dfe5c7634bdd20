import json
import shutil

import duckdb
import pytest

from plmscope.analysis.run import AnalyzeSettings, analyze
from plmscope.cli import main
from plmscope.store.schema import SCHEMA_VERSION

STEPS = ("load", "family specificity", "patterns", "concepts: load pLM", "concepts: pLM forward", "concepts: associate",
         "probes", "descriptions", "write")


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
        # InterPLM's rule, row by row
        assert con.execute(
            "SELECT count(*) FROM latent_concepts WHERE associated <> "
            "(val_f1 > 0.5 AND test_f1 > 0.5 AND n_val >= 10 AND n_test >= 10)").fetchall()[0][0] == 0
        # every stored pair has its interval, around its test F1
        assert con.execute(
            "SELECT count(*) FROM latent_concepts WHERE test_f1_lo IS NULL OR NOT (test_f1_lo <= test_f1 + 1e-9 "
            "AND test_f1 <= test_f1_hi + 1e-9) OR norm_max < 0 OR level NOT IN ('region', 'residue')").fetchall()[0][0] == 0
        # the concept a latent is described with is its associated pair with the highest validation F1
        bad = con.execute(
            "SELECT count(*) FROM latent_analysis a WHERE a.concept IS DISTINCT FROM ("
            "  SELECT arg_max(c.concept, (c.val_f1, c.concept)) FROM latent_concepts c "
            "  WHERE c.sae_id = a.sae_id AND c.latent = a.latent AND c.associated)").fetchall()[0][0]
        assert bad == 0
        assert con.execute(
            "SELECT count(*) FROM latent_concepts WHERE threshold NOT IN (0, 0.15, 0.5, 0.6, 0.8)"
        ).fetchall()[0][0] == 0
        feats = {r[0]: r for r in con.execute("SELECT features, accuracy, macro_f1, n_train, n_test FROM probe_results").fetchall()}
        assert con.execute("SELECT count(*) FROM probe_results WHERE NOT (accuracy_lo <= accuracy AND accuracy <= accuracy_hi) "
                           "OR (source = 'majority') <> (c IS NULL)").fetchall()[0][0] == 0
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
    pr = summary["probes"]
    assert "skipped" not in pr  # the mini atlas has three location classes of 20 proteins
    assert set(feats) == {"sae_mean", "sae_mean_max", "raw_mean", "raw_mean_max", "majority"}
    assert len({f[3:] for f in feats.values()}) == 1  # one split for all four fits and the baseline
    assert set(pr["fits"]) == set(feats) - {"majority"} and set(pr["comparisons"]) == {"mean", "mean_max"}
    assert pr["majority"]["accuracy"] == feats["majority"][1]
    con = duckdb.connect(str(mini_atlas), read_only=True)
    comps = con.execute("SELECT pooling, sae_accuracy, raw_accuracy, n_sae_only, n_raw_only, mcnemar_p "
                        "FROM probe_comparisons ORDER BY pooling").fetchall()
    top = con.execute("SELECT DISTINCT features FROM probe_latents").fetchall()
    con.close()
    assert [c[0] for c in comps] == ["mean", "mean_max"]
    for pooling, sae_acc, raw_acc, n_s, n_r, p in comps:
        assert (sae_acc, raw_acc) == (feats[f"sae_{pooling}"][1], feats[f"raw_{pooling}"][1]) and 0 < p <= 1
        assert sae_acc - raw_acc == pytest.approx((n_s - n_r) / feats["majority"][4])  # discordant counts add up
    assert sorted(t[0] for t in top) == ["sae_mean", "sae_mean_max"]
    assert "majority class" in out and "McNemar p" in out and "mean + max" in out
    # every split is grouped by the MMseqs2 clusters of the atlas's proteins, recorded in the atlas
    con = duckdb.connect(str(mini_atlas), read_only=True)
    meta = json.loads(con.execute("SELECT value FROM atlas_meta WHERE key = 'homology'").fetchall()[0][0])
    n_prot = con.execute("SELECT count(*) FROM proteins").fetchall()[0][0]
    con.close()
    assert meta["n_proteins"] == n_prot and 1 <= meta["n_clusters"] <= n_prot
    assert meta["min_seq_id"] == 0.3 and meta["coverage"] == 0.8 and meta["mmseqs_version"]
    assert summary["homology"] == meta and "MMseqs2" in summary["concepts"]["split"]
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
    old = tmp_path / "old.duckdb"
    # 1: the atlases whose latent_concepts had no validation numbers, intervals or counts per split
    for version in ("0", "1"):
        shutil.copyfile(mini_atlas, old)
        con = duckdb.connect(str(old))
        con.execute(f"UPDATE atlas_meta SET value = '{version}' WHERE key = 'schema_version'")
        con.close()
        assert main(["analyze", "--atlas", str(old)]) == 2
        err = capsys.readouterr().err
        assert f"has atlas schema version {version}; this plmscope reads version {SCHEMA_VERSION}" in err  # the reader's check
        assert "rebuild the atlas" in err
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


def _rows(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall()))  # noqa: S608
                  for t in ("latent_analysis", "latent_concepts", "probe_results", "probe_comparisons", "probe_latents")}
        summary = json.loads(con.execute("SELECT summary FROM analysis_summary").fetchall()[0][0])
    finally:
        con.close()
    summary.pop("timing_s")
    return tables, summary


def test_settings_drive_analyze_as_the_cli_does(mini_atlas, tmp_path, capsys):
    by_settings, by_cli = tmp_path / "settings.duckdb", tmp_path / "cli.duckdb"
    shutil.copyfile(mini_atlas, by_settings)
    shutil.copyfile(mini_atlas, by_cli)
    (summary,) = analyze(AnalyzeSettings(atlas=by_settings, max_proteins=30, seed=3))
    assert summary["seed"] == 3 and summary["concepts"]["n_proteins"] == 30
    assert capsys.readouterr().out == ""  # printing the summaries is the command's job, not analyze's
    assert main(["analyze", "--atlas", str(by_cli), "--max-proteins", "30", "--seed", "3"]) == 0
    assert _rows(by_settings) == _rows(by_cli)


@pytest.fixture(scope="module")
def two_sae_atlas(mini_atlas, tmp_path_factory):
    """The mini atlas's corpus built with its SAE and a second one on the same pLM, keeping no residue
    codes (``--concept-proteins 0``): analyze computes them, one forward for both SAEs."""
    import torch

    from plmscope.sae.io import save_sae
    from plmscope.sae.model import SparseAutoencoder, make_cfg
    from tests._paths import DEMO

    root = tmp_path_factory.mktemp("two_saes")
    cfg = make_cfg(plm="unirep-64", layer=1, d_in=64, d_sae=32, architecture="topk", k=4)
    save_sae(SparseAutoencoder.from_config(cfg, generator=torch.Generator().manual_seed(1)), root / "sae2")
    out = root / "two.duckdb"
    assert main(["build", "--corpus", str(mini_atlas.parent / "corpus.tsv"), "--sae", str(mini_atlas.parent / "sae"),
                 "--sae", str(root / "sae2"), "--out", str(out), "--families", str(DEMO / "pfam_families.tsv"),
                 "--top-n", "5", "--checkpoint-every", "0", "--device", "cpu", "--concept-proteins", "0"]) == 0
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT count(*) FROM residue_codes").fetchall()[0][0] == 0
    con.close()
    return out


def test_analyze_shows_progress_of_each_step_of_each_sae_on_stderr(two_sae_atlas, capsys):
    capsys.readouterr()
    assert main(["analyze", "--atlas", str(two_sae_atlas), "--max-proteins", "40"]) == 0
    captured = capsys.readouterr()
    lines = [line for chunk in captured.err.split("\n") for line in chunk.split("\r") if line.startswith("SAE ")]
    for sae in ("SAE 1/2", "SAE 2/2"):
        # one load and one forward serve both SAEs (their layers from one pass)
        steps = [s for s in STEPS if sae == "SAE 1/2" or s not in ("concepts: load pLM", "concepts: pLM forward")]
        first = []
        for step in steps:
            at = [i for i, line in enumerate(lines) if line.startswith(f"{sae} · {step}")]
            assert at, (sae, step, lines)
            first.append(at[0])
        assert first == sorted(first)  # in the order they run
    forward = [line for line in lines
               if line.startswith("SAE 1/2 · concepts: pLM forward of the 40 proteins the build kept no codes of (layers 1, 2 SAEs)")]
    assert "40/40" in forward[-1] and "prot" in forward[-1]  # proteins counted
    assert not any(line.startswith(("SAE 2/2 · concepts: load pLM", "SAE 2/2 · concepts: pLM forward")) for line in lines)
    assert "SAE 1/2" not in captured.out


def test_probe_lines_show_baseline_intervals_and_why_raw_is_missing():
    from plmscope.analysis.run import format_probe_lines

    fit = {"accuracy": 0.8, "accuracy_ci": [0.75, 0.85], "macro_f1": 0.5, "n_features": 8, "C": 0.01, "cv_accuracy": 0.79}
    pr = {"task": "location", "n_classes": 3, "n_train": 80, "n_test": 20, "n_test_clusters": 15,
          "majority": {"accuracy": 0.6, "accuracy_ci": [0.4, 0.8], "class": "a"},
          "fits": {"sae_mean": fit, "sae_mean_max": fit, "raw_mean": {"skipped": "no embeddings"},
                   "raw_mean_max": {"skipped": "no embeddings"}},
          "comparisons": {"skipped": "no embeddings"}}
    lines = format_probe_lines(pr)
    assert "majority class 0.600 [0.400, 0.800]" in lines[0] and "15 test clusters" in lines[0]
    assert lines[1].split() == ["mean", "SAE", "0.800", "[0.750,", "0.850]", "(C", "0.01)", "vs", "raw", "skipped",
                                "(no", "embeddings)"]
    assert "McNemar" not in "\n".join(lines)
    assert format_probe_lines({"skipped": "too few classes"}) == ["  probes: skipped (too few classes)"]
