"""`plmscope build` on real demo proteins, checked against an independent recomputation
(the pLM and the SAE run directly here, one protein at a time)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import duckdb
import numpy as np
import pytest
import torch

from plmscope.atlas.build import build
from plmscope.atlas.settings import BuildSettings
from plmscope.cli import main
from plmscope.errors import InputError
from plmscope.vocab import AMINO_ACIDS, dequantize

from tests.conftest import DEMO, demo_rows, make_sae

TABLES = ["proteins", "annotations", "families", "structures", "structure_residues", "saes", "latents",
          "latent_examples", "latent_bins", "latent_families", "latent_annotation_types", "latent_neighbors",
          "protein_latents", "protein_latent_stats", "protein_embeddings", "residue_codes"]
VOLATILE = {"saes": ["built_at", "position"]}  # position: display order in the atlas it joined


@pytest.fixture(scope="module")
def brute(tiny_atlas):
    """Per-protein SAE codes computed without the build: {accession: (len, d_sae) array}."""
    from plmscope.plm.base import load_plm
    from plmscope.sae.io import load_sae

    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    prots = con.execute("SELECT accession, sequence FROM proteins ORDER BY accession").fetchall()
    con.close()
    plm = load_plm(tiny_atlas.plm, "cpu")
    sae = load_sae(tiny_atlas.sae_dir)
    out = {}
    with torch.no_grad():
        for acc, seq in prots:
            rep = plm.representations([seq], sae.layer, records=[acc])[0]
            out[acc] = (seq[: len(rep)], sae.encode(rep).numpy())
    return out


def q(con, sql, *params):
    return con.execute(sql, list(params)).fetchall()


def table_rows(path, table, sae_id=None):
    con = duckdb.connect(str(path), read_only=True)
    cols = [c[0] for c in con.execute(f"DESCRIBE {table}").fetchall() if c[0] not in VOLATILE.get(table, [])]
    where = f" WHERE sae_id = '{sae_id}'" if sae_id and "sae_id" in cols else ""
    rows = con.execute(f"SELECT {', '.join(chr(34) + c + chr(34) for c in cols)} FROM {table}{where}").fetchall()
    con.close()
    return sorted(map(repr, rows))


def test_values_match_independent_recomputation(tiny_atlas, brute):
    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    sae_id, n_res, n_prot = q(con, "SELECT sae_id, n_residues, n_proteins FROM saes")[0]
    accs = sorted(brute)
    pmax = np.stack([brute[a][1].max(0) for a in accs])  # proteins x latents
    assert n_prot == len(accs) and n_res == sum(len(brute[a][0]) for a in accs)
    lat = con.execute("SELECT * FROM latents ORDER BY latent").fetchnumpy()
    n_active_res = sum((brute[a][1] > 0).sum(0) for a in accs)
    # densities: brute-force counts, exactly
    assert (lat["n_active_residues"] == n_active_res).all()
    assert (lat["n_active_proteins"] == (pmax > 0).sum(0)).all()
    assert np.allclose(lat["frac_residues"], n_active_res / n_res)
    assert (lat["is_dead"] == (n_active_res == 0)).all()
    np.testing.assert_allclose(lat["max_act"], pmax.max(0), rtol=1e-5, atol=1e-6)
    sums = sum(brute[a][1].sum(0) for a in accs)
    live = n_active_res > 0
    np.testing.assert_allclose(lat["mean_act"][live], sums[live] / n_active_res[live], rtol=1e-4)
    # histogram totals = active residue counts
    assert [sum(h) for h in lat["hist_counts"]] == list(n_active_res)
    # amino-acid counts of active residues
    aa = AMINO_ACIDS
    for latent in np.flatnonzero(live)[:10]:
        counts = np.zeros(20, int)
        for a in accs:
            seq, z = brute[a]
            for i in np.flatnonzero(z[:, latent] > 0):
                if seq[i] in aa:
                    counts[aa.index(seq[i])] += 1
        assert list(lat["aa_counts"][latent]) == list(counts)
    # top example = the protein with the highest activation (ties within float noise allowed)
    for latent in np.flatnonzero(live):
        top = q(con, "SELECT accession, max_act, max_pos FROM latent_examples WHERE sae_id=? AND latent=? "
                     "AND kind='top' ORDER BY rank", sae_id, int(latent))
        best = pmax[:, latent].max()
        assert pmax[accs.index(top[0][0]), latent] >= best * (1 - 1e-5)
        got = [pmax[accs.index(t[0]), latent] for t in top]
        assert got == sorted(got, reverse=True) or np.allclose(got, sorted(got, reverse=True), rtol=1e-5)
        z = brute[top[0][0]][1][:, latent]
        assert abs(z[top[0][2] - 1] - z.max()) <= 1e-5 * z.max()
    con.close()


def test_quantile_bins_hold_what_they_say(tiny_atlas, brute):
    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    accs = sorted(brute)
    pmax = np.stack([brute[a][1].max(0) for a in accs])
    n_bins = json.loads(q(con, "SELECT value FROM atlas_meta WHERE key='build_settings'")[0][0])["bins"]
    bins = q(con, "SELECT latent, bin, lo, hi, n_proteins FROM latent_bins ORDER BY latent, bin")
    assert bins
    for latent, b, lo, hi, n in bins:
        col = pmax[:, latent]
        M = col.max()
        idx = np.minimum((col.astype(np.float64) * n_bins / M).astype(int), n_bins - 1)
        brute_n = int(((col > 0) & (idx == b)).sum())
        # float noise between batched and single-protein runs may move a protein sitting on an edge
        assert abs(n - brute_n) <= 1, (latent, b, n, brute_n)
        for acc, mx in q(con, "SELECT accession, max_act FROM latent_examples WHERE latent=? AND kind='bin' AND bin=?",
                         latent, b):
            assert lo * (1 - 1e-6) <= mx <= hi * (1 + 1e-6)
            assert pmax[accs.index(acc), latent] == pytest.approx(mx, rel=1e-5)
    assert sum(r[4] for r in bins) == int((pmax > 0).sum())
    con.close()


def test_protein_top_latents_and_uint8_round_trip(tiny_atlas, brute):
    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    scale = dict(q(con, "SELECT latent, max_act FROM latents"))
    k = json.loads(q(con, "SELECT value FROM atlas_meta WHERE key='build_settings'")[0][0])["protein_top"]
    for acc in sorted(brute)[:25]:
        seq, z = brute[acc]
        rows = q(con, "SELECT latent, max_act, activations FROM protein_latents WHERE accession=? ORDER BY rank", acc)
        pm = z.max(0)
        expect = [int(i) for i in sorted(np.flatnonzero(pm > 0), key=lambda i: (-pm[i], i))[:k]]
        got = [r[0] for r in rows]
        assert got == expect or np.allclose(pm[got], pm[expect], rtol=1e-5)
        for latent, mx, blob in rows:
            vec = dequantize(np.frombuffer(blob, np.uint8), scale[latent])
            assert len(vec) == len(seq)
            assert np.abs(vec - z[:, latent]).max() <= scale[latent] / 510 + 1e-5 * scale[latent]
    # stats rows = every active pair
    n_pairs = sum(int((z.max(0) > 0).sum()) for _, z in brute.values())
    assert q(con, "SELECT count(*) FROM protein_latent_stats")[0][0] == n_pairs
    con.close()


def test_embeddings_are_the_mean_and_max_of_the_plm_representation(tiny_atlas):
    """protein_embeddings holds, per protein, the mean and the per-dimension max over residues of the
    raw layer representation: compared with the pLM run here on single real proteins."""
    from plmscope.plm.base import load_plm

    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    layer = q(con, "SELECT layer FROM saes")[0][0]
    n_prot = q(con, "SELECT count(*) FROM proteins")[0][0]
    assert q(con, "SELECT count(DISTINCT accession) FROM protein_embeddings")[0][0] == n_prot
    rows = q(con, "SELECT p.accession, p.sequence, e.mean_rep, e.max_rep FROM protein_embeddings e "
                  "JOIN proteins p USING (accession) ORDER BY p.accession LIMIT 6")
    con.close()
    plm = load_plm(tiny_atlas.plm, "cpu")
    with torch.no_grad():
        for acc, seq, mean_rep, max_rep in rows:
            rep = plm.representations([seq], layer, records=[acc])[0].numpy()
            # batched build vs one protein here: float noise only
            np.testing.assert_allclose(max_rep, rep.max(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(mean_rep, rep.mean(0), rtol=1e-5, atol=1e-5)
            assert not np.allclose(max_rep, mean_rep)  # really the max, not the mean twice


def test_bad_inputs_are_counted_with_file_and_record(tiny_atlas):
    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    skipped = json.loads(q(con, "SELECT value FROM atlas_meta WHERE key='skipped'")[0][0])
    assert skipped["invalid residue"]["examples"][0]["record"] == "BAD_RESIDUE"
    assert skipped["invalid residue"]["examples"][0]["file"] == str(tiny_atlas.corpus)
    assert skipped["empty sequence"]["count"] == 1
    assert skipped["duplicate accession"]["count"] >= 1
    assert skipped["truncated at the pLM limit"]["count"] == 1
    assert skipped["structure file missing"]["examples"][0]["file"] == str(tiny_atlas.manifest)
    assert skipped["structure does not match protein"]["count"] == 1
    (truncated,) = q(con, "SELECT truncated_to FROM proteins WHERE length > 1022")[0]
    assert truncated == 1022
    assert q(con, "SELECT count(*) FROM proteins WHERE has_structure")[0][0] == q(con, "SELECT count(DISTINCT accession) FROM structures")[0][0] > 10
    locs = q(con, "SELECT count(*) FROM proteins WHERE len(locations) > 0")[0][0]
    assert locs > 0
    con.close()


def test_shards_merged_equal_one_pass(tiny_atlas, tmp_path, capsys):
    states = []
    for i in range(2):
        st = tmp_path / f"state{i}"
        assert main(["build", *tiny_atlas.build_args, "--shard", f"{i}/2", "--state-out", str(st)]) == 0
        states.append(st)
    out = tmp_path / "merged.duckdb"
    assert main(["merge", "--state", str(states[1]), "--state", str(states[0]), "--out", str(out)]) == 0
    for t in TABLES:
        assert table_rows(out, t) == table_rows(tiny_atlas.path, t), t
    assert table_rows(out, "residue_codes")  # the concept proteins' codes, from both shards
    # a missing shard is refused, and one given twice
    assert main(["merge", "--state", str(states[0]), "--out", str(tmp_path / "x.duckdb")]) == 2
    assert not (tmp_path / "x.duckdb").exists()
    assert main(["merge", "--state", str(states[0]), "--state", str(states[0]), "--out", str(tmp_path / "x.duckdb")]) == 2
    assert f"--state {states[0]} is given twice" in capsys.readouterr().err
    # so is a state of another layout version
    manifest = json.loads((states[0] / "state.json").read_text())
    (states[0] / "state.json").write_text(json.dumps(manifest | {"version": manifest["version"] + 1}))
    assert main(["merge", "--state", str(states[0]), "--state", str(states[1]), "--out", str(tmp_path / "x.duckdb")]) == 2
    assert "build state version" in capsys.readouterr().err and not (tmp_path / "x.duckdb").exists()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_settings(tiny_atlas, **changes) -> BuildSettings:
    """``tiny_atlas.build_args`` as BuildSettings, with ``changes``."""
    base = dict(corpus=tiny_atlas.corpus, saes=(tiny_atlas.sae_dir,), structures=tiny_atlas.structures,
                manifest=tiny_atlas.manifest, families=DEMO / "pfam_families.tsv", top_n=6, bins=4, per_bin=3,
                protein_top=8, chunk_size=16, token_budget=2048, checkpoint_every=0, device="cpu")
    return BuildSettings(**(base | changes))


def test_settings_match_the_command_line(tiny_atlas, tmp_path):
    from plmscope.cli import build_parser

    ns = build_parser("build").parse_args(["build", *tiny_atlas.build_args, "--out", str(tmp_path / "a.duckdb")])
    assert BuildSettings.from_args(ns) == tiny_settings(tiny_atlas, out=tmp_path / "a.duckdb")


@pytest.mark.parametrize(("changes", "words"), [
    ({"shard": (1, 2), "out": "a.duckdb"}, "--shard i/n needs --state-out"),
    ({"shard": (2, 2), "state_out": "st"}, "--shard 2/2"),
    ({}, "give --out ATLAS"),
    ({"chunk_size": 0, "out": "a.duckdb"}, "--chunk-size must be at least 1"),
    ({"encode": "fast", "out": "a.duckdb"}, "--encode 'fast'"),
])
def test_settings_refuse_bad_flag_combinations(tiny_atlas, tmp_path, changes, words):
    changes = {k: tmp_path / v if k in ("out", "state_out") else v for k, v in changes.items()}
    with pytest.raises(InputError, match=re.escape(words)):
        tiny_settings(tiny_atlas, **changes)


def test_bad_shard_flag_exits_2_naming_it(tiny_atlas, tmp_path, capsys):
    rc = main(["build", *tiny_atlas.build_args, "--shard", "3", "--state-out", str(tmp_path / "st")])
    assert rc == 2 and "--shard '3': expected i/n" in capsys.readouterr().err
    assert not (tmp_path / "st").exists()


def test_interrupted_build_keeps_old_atlas_and_resume_finishes(tiny_atlas, tmp_path):
    sae64 = make_sae(tmp_path / "sae64", tiny_atlas.plm, d_sae=64, k=4, seed=1)
    args = [a if a != str(tiny_atlas.sae_dir) else str(sae64) for a in tiny_atlas.build_args]
    out = tmp_path / "atlas.duckdb"
    shutil.copyfile(tiny_atlas.path, out)
    before = _sha(out)

    class Boom(Exception):
        pass

    def stop(n):
        if n == 2:
            raise Boom

    with pytest.raises(Boom):  # the library driven directly, stopped after the second checkpoint
        build(tiny_settings(tiny_atlas, saes=(sae64,), out=out), on_checkpoint=stop)
    assert _sha(out) == before  # the old atlas is untouched
    assert not list(tmp_path.glob("atlas.duckdb.tmp-*"))
    assert main(["build", *args, "--out", str(out), "--resume"]) == 0
    con = duckdb.connect(str(out), read_only=True)
    ids = [r[0] for r in con.execute("SELECT sae_id FROM saes ORDER BY position").fetchall()]
    con.close()
    assert len(ids) == 2
    fresh = tmp_path / "fresh.duckdb"
    assert main(["build", *args, "--out", str(fresh)]) == 0
    for t in TABLES:
        assert table_rows(out, t, ids[1]) == table_rows(fresh, t, ids[1]), t
    # the first SAE's rows are exactly the old atlas's
    assert table_rows(out, "latent_examples", ids[0]) == table_rows(tiny_atlas.path, "latent_examples", ids[0])


def test_sae_for_another_plm_is_refused(tiny_atlas, tmp_path, capsys):
    other = make_sae(tmp_path / "other", "unirep-64", layer=1, d_in=64, d_sae=32, k=4)
    args = [a for a in tiny_atlas.build_args]
    rc = main(["build", *args, "--sae", str(other), "--out", str(tmp_path / "a.duckdb")])
    assert rc == 2 and "one atlas holds SAEs of one pLM" in capsys.readouterr().err
    assert not (tmp_path / "a.duckdb").exists()
    # and one that clashes with the pLM of an existing atlas
    out = tmp_path / "b.duckdb"
    shutil.copyfile(tiny_atlas.path, out)
    before = _sha(out)
    rc = main(["build", "--corpus", str(tiny_atlas.corpus), "--sae", str(other), "--out", str(out), "--device", "cpu"])
    assert rc == 2 and _sha(out) == before


def test_nothing_usable_exits_2(tmp_path, tiny_atlas):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">A\nMK1V\n>B\n\n")
    rc = main(["build", "--corpus", str(bad), "--sae", str(tiny_atlas.sae_dir), "--out", str(tmp_path / "x.duckdb")])
    assert rc == 2 and not (tmp_path / "x.duckdb").exists()


def test_flat_file_features_become_annotations(tiny_atlas, tmp_path):
    out = tmp_path / "flat.duckdb"
    rc = main(["build", "--corpus", str(DEMO / "swissprot_sample.dat"), "--sae", str(tiny_atlas.sae_dir),
               "--limit", "8", "--max-length", "400", "--out", str(out), "--device", "cpu", "--top-n", "4"])
    assert rc == 0
    con = duckdb.connect(str(out), read_only=True)
    skipped = json.loads(q(con, "SELECT value FROM atlas_meta WHERE key='skipped'")[0][0])
    assert skipped["longer than --max-length"]["count"] == 2  # the 1st and 3rd entries; 8 shorter ones follow
    assert q(con, "SELECT count(*) FROM annotations WHERE kind='feature'")[0][0] > 0
    types = {r[0] for r in q(con, "SELECT DISTINCT type FROM latent_annotation_types")}
    assert types & {r[0] for r in q(con, "SELECT DISTINCT type FROM annotations")}
    assert q(con, "SELECT count(*) FROM proteins WHERE organism <> ''")[0][0] == 8
    con.close()


def test_screen_and_dense_encode_build_the_same_atlas(tiny_atlas, tmp_path):
    """`--encode screen` (bf16 screen + exact rescoring) and `--encode dense` give the same codes,
    so the same atlas up to fp32 summation order."""
    sae = make_sae(tmp_path / "sae1024", tiny_atlas.plm, d_sae=1024, k=4, seed=2)
    args = [a if a != str(tiny_atlas.sae_dir) else str(sae) for a in tiny_atlas.build_args]
    out = {}
    for mode in ("screen", "dense"):
        out[mode] = tmp_path / f"{mode}.duckdb"
        assert main(["build", *args, "--encode", mode, "--out", str(out[mode])]) == 0
    cons = {m: duckdb.connect(str(p), read_only=True) for m, p in out.items()}
    meta = {m: json.loads(q(c, "SELECT value FROM atlas_meta WHERE key = 'summary'")[0][0]) for m, c in cons.items()}
    assert [s["encode"] for s in meta["screen"]["saes"].values()] == ["bf16-screen"]
    assert [s["encode"] for s in meta["dense"]["saes"].values()] == ["dense"]
    st = next(iter(meta["screen"]["saes"].values()))["encode_stats"]
    assert st["rows"] == meta["screen"]["n_residues"] and st["dense_rows"] < 0.05 * st["rows"]  # the screen did it
    lat = {m: c.execute("SELECT * FROM latents ORDER BY latent").fetchnumpy() for m, c in cons.items()}
    for col in ("n_active_residues", "n_active_proteins"):
        assert (lat["screen"][col] == lat["dense"][col]).all(), col
    np.testing.assert_allclose(lat["screen"]["max_act"], lat["dense"]["max_act"], rtol=1e-5)
    sql = ("SELECT latent, kind, bin, rank, accession, max_pos, n_active, activations FROM latent_examples "
           "ORDER BY latent, kind, bin, rank")
    ex = {m: c.execute(sql).fetchall() for m, c in cons.items()}
    assert [r[:7] for r in ex["screen"]] == [r[:7] for r in ex["dense"]]
    for a, b in zip(ex["screen"], ex["dense"]):  # uint8 codes: at most one step apart (rounding)
        assert np.abs(np.frombuffer(a[7], np.uint8).astype(int) - np.frombuffer(b[7], np.uint8)).max() <= 1
    stats_sql = "SELECT accession, latent, n_active FROM protein_latent_stats ORDER BY accession, latent"
    assert cons["screen"].execute(stats_sql).fetchall() == cons["dense"].execute(stats_sql).fetchall()
    for c in cons.values():
        c.close()


def test_spill_parts_build_the_same_atlas(tiny_atlas, tmp_path, monkeypatch):
    """Per-protein outputs spilled after every batch (many parts per chunk), by the pipelined
    build, give the atlas of one spill per chunk by the serial build (``--pipeline 0``), row for
    row."""
    from plmscope.atlas import encode

    args = [a if a != "2048" else "256" for a in tiny_atlas.build_args]  # several batches per chunk
    one = tmp_path / "one.duckdb"
    assert main(["build", *args, "--pipeline", "0", "--out", str(one)]) == 0
    monkeypatch.setattr(encode, "SPILL_BYTES", 1)
    state = tmp_path / "state"
    assert main(["build", *args, "--state-out", str(state)]) == 0
    parts = sorted(p.name for p in state.glob("sae-*/spill-000000-*.npz"))
    assert len(parts) >= 3 and parts[0] == "spill-000000-000.npz"
    many = tmp_path / "many.duckdb"
    assert main(["merge", "--state", str(state), "--out", str(many)]) == 0
    for t in TABLES:
        assert table_rows(many, t) == table_rows(one, t), t


def _unirep_codes(seqs: list[str], sae_dirs: list) -> list[list[np.ndarray]]:
    """Per SAE, per protein, the dense SAE codes computed directly (one protein at a time)."""
    from plmscope.plm.base import load_plm
    from plmscope.sae.io import load_sae

    plm = load_plm("unirep-64", "cpu")
    out = []
    for d in sae_dirs:
        sae = load_sae(d)
        out.append([sae.encode(plm.representations([s], sae.layer)[0]).detach().numpy() for s in seqs])
    return out


def test_context_free_residue_one_left_out_and_one_forward_serves_two_layers(tmp_path):
    """UniRep's residue 1 carries no protein context: no statistic of the atlas counts it.  Two SAEs on
    layers 1 and 3 are built from one forward and equal what each SAE gives run directly."""
    rows = [r for r in demo_rows() if len(r["sequence"]) < 120][:10]
    corpus = tmp_path / "c.fasta"
    corpus.write_text("".join(f">{r['accession']}\n{r['sequence']}\n" for r in rows))
    saes = [make_sae(tmp_path / f"s{layer}", "unirep-64", layer=layer, d_in=64, d_sae=48, k=4, seed=layer)
            for layer in (1, 3)]
    out = tmp_path / "u.duckdb"
    args = ["build", "--corpus", str(corpus), "--out", str(out), "--device", "cpu", "--top-n", "50",
            "--protein-top", "48", "--checkpoint-every", "0"]
    assert main([*args, *sum((["--sae", str(s)] for s in saes), [])]) == 0
    seqs = [r["sequence"] for r in rows]
    codes = _unirep_codes(seqs, saes)
    con = duckdb.connect(str(out), read_only=True)
    sae_rows = q(con, "SELECT sae_id, layer, context_free, n_residues, aa_background FROM saes ORDER BY layer")
    for (sid, layer, cf, n_res, background), per_prot in zip(sae_rows, codes):
        assert cf == 1 and n_res == sum(len(s) - 1 for s in seqs) == sum(background)
        counted = np.concatenate([z[1:] for z in per_prot])  # residue 1 dropped
        lat = q(con, "SELECT latent, n_active_residues, n_active_proteins, max_act FROM latents "
                     "WHERE sae_id = ? ORDER BY latent", sid)
        n_res_active = np.array([r[1] for r in lat])
        np.testing.assert_array_equal(n_res_active, (counted > 0).sum(0))
        np.testing.assert_array_equal([r[2] for r in lat], sum((z[1:] > 0).any(0) for z in per_prot))
        np.testing.assert_allclose([r[3] for r in lat], counted.max(0), rtol=1e-4, atol=1e-5)
        # residue 1 fires in (nearly) every protein at some latents; none of it reaches the atlas
        assert any((z[0] > 0).any() for z in per_prot)
        assert q(con, "SELECT count(*) FROM protein_latents WHERE sae_id = ? AND max_pos = 1", sid)[0][0] == 0
        assert q(con, "SELECT count(*) FROM latent_examples WHERE sae_id = ? AND max_pos = 1", sid)[0][0] == 0
    con.close()


def test_esm2_has_no_context_free_positions(tiny_atlas):
    con = duckdb.connect(str(tiny_atlas.path), read_only=True)
    (cf, n_res), = q(con, "SELECT context_free, n_residues FROM saes")
    total = q(con, "SELECT sum(coalesce(truncated_to, length)) FROM proteins")[0][0]
    con.close()
    assert cf == 0 and n_res == total
