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


SEQS = {"P1": "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK",
        "P2": "MSDNELKQAIEEAFGKHGAPVSLTREELLKALEKLGVDTSNLEAFAKLIRG"}


def _full_forward(plm, layer: int, seq: str, splice) -> torch.Tensor:
    """One sequence from the embedding through every layer and the head with ``splice`` after
    layer ``layer``: the path output effects took before it resumed from kept layer states (UniRep:
    its own ``logits`` with the splice hooked in; ESM-2: its layer path, which ``test_intervene``
    holds to fair-esm's forward)."""
    from plmscope.plm.base import splice_residue_rows

    n = len(seq)
    if plm.family == "unirep":
        hook = plm.layers[layer - 1].register_forward_hook(lambda m, i, out: splice_residue_rows(out, [n], splice))
        try:
            return torch.log_softmax(plm.logits([seq])[0], -1)
        finally:
            hook.remove()
    x, padding_mask = plm._embed(plm._tokens([seq]))
    x = splice_residue_rows(plm._layers(x, padding_mask, 0, layer), [n], splice)
    x = plm._layers(x, padding_mask, layer, plm.num_layers)
    return torch.log_softmax(plm.model.lm_head(x).float(), -1)[0, 1 : n + 1]


@pytest.mark.parametrize("family,top", [("esm2", False), ("esm2", True), ("unirep", False), ("unirep", True)])
def test_resumed_effects_equal_full_forwards(family, top, esm_pair, unirep_pair, tmp_path):
    """``output_effects`` (clean states kept, ablations resumed above the SAE's layer, UniRep cut
    after the last read-out row, several batches and state windows) equals a full forward per
    (latent, example), at a middle layer and at the top one."""
    from plmscope.causal.effects import aa_classes
    from plmscope.causal.output_effect import (OutputEffectSettings, make_example, output_effects, readout,
                                               residues_needed)
    from plmscope.sae.io import load_sae
    from tests.conftest import make_sae

    plm, sae = esm_pair if family == "esm2" else unirep_pair
    if top:
        sae = load_sae(make_sae(tmp_path / "top", plm.name, layer=plm.num_layers, d_in=64, d_sae=128, k=8, seed=3)).eval()
    classes = aa_classes(plm)
    examples = []
    with torch.no_grad():
        for acc, seq in SEQS.items():
            z = sae.encode(plm.representations([seq], sae.layer)[0])
            live = [int(j) for j in torch.nonzero(z.max(0).values > 0).flatten()]
            for latent in live[:: max(1, len(live) // 8)]:  # ~8 latents per protein, sharing its clean pass
                examples.append(make_example(latent, acc, seq, z[:, latent].numpy(), max_residues=40))
    examples = [e for e in examples if e is not None]
    keys = [e.key for e in examples]
    assert len(examples) > 8 and max(map(keys.count, keys)) > 1 and len(set(keys)) > 2  # shared and windowed
    if family == "unirep":  # the cut after the last active residue is exercised
        assert any(residues_needed(family, e.active, len(e.sequence)) < len(e.sequence) for e in examples)
    res = output_effects(plm, sae, examples, OutputEffectSettings(token_budget=100, state_tokens=45))

    total: dict[int, np.ndarray] = {}
    count: dict[int, int] = {}
    with torch.no_grad():
        for e in examples:
            iv = Intervention((Edit(e.latent, "ablate"),))
            clean = _full_forward(plm, sae.layer, e.sequence, make_splice(sae, [None], [len(e.sequence)]))
            abl = _full_forward(plm, sae.layer, e.sequence, make_splice(sae, [iv], [len(e.sequence)]))
            rows = torch.as_tensor(readout(family, e.active, len(e.sequence)), dtype=torch.long)
            total[e.latent] = total.get(e.latent, 0) + (clean[rows][:, classes] - abl[rows][:, classes]).double().sum(0).numpy()
            count[e.latent] = count.get(e.latent, 0) + len(rows)
    expected = sorted(k for k in count if count[k])
    assert res.latents.tolist() == expected
    assert res.n_positions.tolist() == [count[k] for k in expected]
    want = np.array([total[k] / count[k] for k in expected])
    assert np.abs(want).max() > 1e-3  # ablations do change the output: the comparison can fail
    np.testing.assert_allclose(res.effect, want, atol=1e-5, rtol=0)
