"""scripts/unirep1900.py: the per-CPU-minute concept benchmark of a second pLM against the demo's
UniRep-256 SAEs, run end to end on a tiny case (unirep-64, a few proteins), and the README's table
printed from the committed result."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from plmscope import demo


def _script():
    spec = importlib.util.spec_from_file_location("unirep1900", demo.REPO / "scripts" / "unirep1900.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _script()


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_records_what_it_measured(tmp_path):
    s = bench.BenchSettings(workdir=tmp_path / "work", out=tmp_path / "out.json", model="unirep-64", latents=64, k=8,
                            train_proteins=5, concept_proteins=24, eval_proteins=2, same_subset=False,
                            demo_proteins=300, enrich_families=2, per_family=3)
    result = bench.run(s)
    assert json.loads(s.out.read_text())["arms"][0]["model"] == result["arms"][0]["model"]
    assert result["threads"] == 1 and result["machine"]["gflops"] > 0 and result["machine"]["torch_threads"] == 1
    committed, target = result["arms"]
    assert (committed["model"], target["model"]) == ("unirep-256", "unirep-64")
    assert [lay["layer"] for lay in committed["layers"]] == list(demo.DEMO_LAYERS)
    assert [(lay["layer"], lay["d_sae"], lay["k"], lay["d_in"]) for lay in target["layers"]] == [(1, 64, 8, 64)]

    # the homology split is respected: SAE training proteins from "train", concept proteins from no training split
    sets = demo.read_sae_sets()
    trained = [line[1:].strip() for line in (s.workdir / "train.fasta").read_text().splitlines() if line.startswith(">")]
    assert len(trained) == 5 and {sets[a] for a in trained} == {"train"}
    with open(s.workdir / "concepts.tsv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    concept = [r["accession"] for r in rows]
    info = result["sets"]["concepts"]
    # two families topped up to three carriers each from the held-out rest of the demo table
    families = info["enrichment"]["families"]
    assert len(families) == 2 and info["n_from_demo_atlas"] == 24
    for fam in families:
        assert sum(fam in r["pfam"] for r in rows) >= 3
    n = 24 + sum(f["added"] for f in families.values())
    assert len(concept) == len(set(concept)) == n and all(sets.get(a) != "train" for a in concept)
    assert info["n_proteins"] == n == target["atlas_proteins"] == committed["atlas_proteins"]
    assert sum(info["by_sae_set"].values()) == n
    assert target["training"]["n_proteins"] == 5 and target["eval"]["n_proteins"] == 2

    for arm in (committed, target):
        assert arm["cpu_s"]["build"] > 0 and arm["cpu_s"]["analyze"] > 0
        for lay in arm["layers"]:
            assert {"associated_pairs", "associated_latents", "associated_concepts", "concepts_tested"} <= set(lay)
            assert lay["associated_concepts"] == len(lay["concepts"]) <= lay["concepts_tested"] == len(lay["tested"])
            assert 0 < lay["concept_proteins"] <= 24
        pm = arm["per_cpu_minute"]["build_and_analyze"]
        assert pm["cpu_s"] == pytest.approx(arm["cpu_s"]["build"] + arm["cpu_s"]["analyze"], abs=0.11)
        assert pm["concepts_per_cpu_min"] == pytest.approx(pm["associated_concepts"] / (pm["cpu_s"] / 60), abs=1e-3)
    assert target["cpu_s"]["sae_training"] > 0 and committed["cpu_s"]["sae_training"] is None
    assert "with_sae_training" in target["per_cpu_minute"] and "with_sae_training" not in committed["per_cpu_minute"]
    assert str(demo.REPO) not in s.out.read_text()  # committed paths read the same on every clone

    # a second run re-uses every finished step and its recorded cost
    again = bench.run(s)
    assert [a["cpu_s"] for a in again["arms"]] == [a["cpu_s"] for a in result["arms"]]
    table = bench.table(result)
    assert "unirep-64 (5)" in table and "unirep-256 (6,401)" in table


def test_training_proteins_beyond_the_train_split_are_refused():
    s = bench.BenchSettings(train_proteins=10**6)
    with pytest.raises(SystemExit, match="--train-proteins 1000000: the train split has 6401 proteins"):
        bench.training_proteins(s)


def test_readme_table_is_printed_from_the_committed_json():
    result = json.loads(bench.OUT.read_text())
    assert bench.table(result) in (demo.REPO / "README.md").read_text()  # `python scripts/unirep1900.py --table --write`
    target = next(a for a in result["arms"] if a["model"] == "unirep-1900")
    assert target["layers"][0]["d_in"] == 1900 and result["threads"] == 1
    assert {a["model"] for a in result["arms"]} == {"unirep-1900", "unirep-256"}
