"""The analyze step "output effects" on a real atlas: stored per latent, shown in the latent's JSON
and page, and equal to a direct recomputation for one latent."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pytest
import torch

from plmscope.causal.intervene import Edit, Intervention, make_splice
from plmscope.causal.output_effect import promoted
from plmscope.cli import main
from plmscope.vocab import AMINO_ACIDS


@pytest.fixture(scope="module")
def analysed(mini_atlas, tmp_path_factory):
    path = tmp_path_factory.mktemp("oe") / "atlas.duckdb"
    shutil.copy(mini_atlas, path)
    assert main(["analyze", "--atlas", str(path), "--device", "cpu", "--max-proteins", "0",
                 "--output-effect-examples", "2"]) == 0
    return path


def test_effects_stored_and_match_a_direct_recomputation(analysed):
    from plmscope.plm.unirep import UniRep
    from plmscope.sae.io import sae_from_bytes
    from plmscope.store.reader import AtlasReader, decode_activations

    con = duckdb.connect(str(analysed), read_only=True)
    rows = con.execute("SELECT latent, effect, n_examples, n_positions FROM latent_output_effects ORDER BY n_positions DESC").fetchall()
    assert len(rows) > 10 and all(len(r[1]) == 20 and r[2] <= 2 for r in rows)
    latent, effect, _, n_pos = rows[0]
    sae_id = con.execute("SELECT sae_id FROM saes").fetchone()[0]
    ex = con.execute("SELECT e.activations, p.sequence FROM latent_examples e JOIN proteins p USING (accession) "
                     "WHERE e.sae_id = ? AND e.latent = ? AND e.kind = 'top' AND e.rank < 2 ORDER BY e.rank", [sae_id, latent]).fetchall()
    scale = con.execute("SELECT max_act FROM latents WHERE sae_id = ? AND latent = ?", [sae_id, latent]).fetchone()[0]
    con.close()
    reader = AtlasReader(analysed)
    cfg, weights = reader.sae_weights(sae_id)
    sae = sae_from_bytes(cfg, weights).eval()
    plm = UniRep.load("unirep-64", "cpu")
    classes = [plm.target_class(a) for a in AMINO_ACIDS]
    total, count = np.zeros(20), 0
    with torch.no_grad():
        for blob, seq in ex:
            acts = np.asarray(decode_activations(blob, scale))
            seq = seq[: len(acts)]
            rows_ = np.flatnonzero(acts > 0) + 1  # UniRep reads out at the next residue
            rows_ = rows_[rows_ < len(seq)]
            clean = plm.splice_forward([seq], sae.layer)[0].logprobs[:, classes]
            iv = Intervention((Edit(latent, "ablate"),))
            abl = plm.splice_forward([seq], sae.layer, make_splice(sae, [iv], [len(seq)]))[0].logprobs[:, classes]
            total += (clean[rows_] - abl[rows_]).double().sum(0).numpy()
            count += len(rows_)
    assert count == n_pos
    np.testing.assert_allclose(effect, total / count, atol=1e-6)
    assert np.abs(effect).max() > 0
    detail = reader.latent(sae_id, latent)["output_effect"]
    assert detail["promotes"] == promoted(effect)[0] and detail["n_positions"] == n_pos


def test_latent_page_and_json_show_the_effect(analysed):
    from fastapi.testclient import TestClient

    from plmscope.settings import Settings
    from plmscope.web.app import create_app

    con = duckdb.connect(str(analysed), read_only=True)
    sae_id, latent = con.execute("SELECT sae_id, latent FROM latent_output_effects ORDER BY n_positions DESC LIMIT 1").fetchone()
    con.close()
    with TestClient(create_app(Settings(atlas=analysed, load_model=False))) as c:
        j = c.get(f"/latents/{sae_id}/{latent}.json").json()
        assert len(j["output_effect"]["effect"]) == 20 and j["output_effect"]["promotes"]
        html = c.get(f"/latents/{sae_id}/{latent}").text
        assert 'id="output-effect"' in html and "promotes" in html
