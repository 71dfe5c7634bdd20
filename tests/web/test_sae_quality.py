"""The `/` page's SAE quality cards, rendered by the app's own Jinja environment from eval-sae
metrics as stored with an SAE: the mean-ablation headline with its interval, the splice's cost,
the objective's name and the set the numbers come from; zero-ablation only as a labelled detail."""

from __future__ import annotations

import json
import re

from plmscope.web.templating import make_templates
from tests._paths import REPO

TEMPLATES = REPO / "frontend" / "templates"
COMMITTED_CFG = REPO / "data" / "demo" / "sae" / "L1-topk512-k32" / "cfg.json"


def _render(metrics: dict) -> str:
    env = make_templates(TEMPLATES).env
    sae = {"metrics": metrics, "plm": "unirep-256", "layer": 1, "d_in": 256, "d_sae": 1024, "n_dead": 0,
           "dead_fraction": 0.0}
    m = {"corpus": {"n_proteins": 10, "n_residues": 1000, "n_with_structure": 1}, "atlas_id": "x", "meta": {}}
    return env.get_template("_sae_quality.html").render(sae=sae, m=m)


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_cards_show_the_mean_ablation_headline_of_the_committed_demo_sae():
    metrics = json.loads(COMMITTED_CFG.read_text())["plmscope"]["metrics"]
    text = _text(_render(metrics))
    head = metrics["headline"]
    rec = head["loss_recovered_vs_mean_ablation_pct"]
    assert f"% {metrics['objective']['name']} loss recovered vs mean-ablation" in text
    assert f"{rec['value']:.1f}%" in text and f"[{rec['ci95'][0]:.1f}, {rec['ci95'][1]:.1f}]" in text
    assert f"splice costs {head['splice_delta_nats']['value']:.4f} nats" in text
    assert f"{head['splice_cost_pct_of_model_gain']['value']:.1f}%" in text
    assert f"{metrics['corpus']['set']} set, {metrics['corpus']['n_proteins']} proteins" in text
    zero = metrics["zero_ablation"]["loss_recovered_vs_zero_ablation_pct"]["value"]
    assert f"zero-ablation (detail, not the headline): {metrics['lm_loss']['zero_ablated']:.3f} nats, {zero:.2f}%" in text
    assert "masked-LM" not in text  # the demo's UniRep is scored on its own objective


def test_cards_label_an_old_zero_ablation_only_number_and_missing_metrics():
    old = {"explained_variance": 0.8, "l0": 32, "loss_recovered_pct": 99.63,
           "lm_loss": {"objective": "next-amino-acid cross-entropy", "clean": 2.78, "spliced": 2.795,
                       "zero_ablated": 7.05}}
    text = _text(_render(old))
    assert "99.63% recovered vs zero-ablation (not comparable to mean-ablation)" in text
    assert "vs mean-ablation –" in text  # no headline without the baseline
    assert "–" in _text(_render({}))
