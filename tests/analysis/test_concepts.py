import numpy as np
import pytest
from scipy import sparse

from plmscope.analysis import concepts


def test_residue_precision_and_region_recall_on_a_hand_made_example():
    # two proteins of 10 residues; concept X: regions [2..4] in p0 and [6..9] in p1 (0-based, end excl.)
    lengths = [10, 10]
    offsets = np.array([0, 10])
    regions = [(0, "X", 2, 4), (1, "X", 6, 9)]
    masks = concepts.build_masks(regions, offsets, 20, ["X"])
    a = np.zeros((20, 1), np.float32)
    a[2, 0] = 1.0  # inside region 1 (found)
    a[3, 0] = 0.3  # inside region 1, weak
    a[15, 0] = 0.4  # outside any region
    p, r, f = concepts.concept_scores(sparse.csr_matrix(a), masks, thresholds=(0.0, 0.5))
    # threshold 0: predicted {2,3,15}: 2 of 3 inside -> P = 2/3; regions found 1 of 2 -> R = 1/2
    assert p[0, 0, 0] == pytest.approx(2 / 3) and r[0, 0, 0] == pytest.approx(0.5)
    assert f[0, 0, 0] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # threshold 0.5: predicted {2}: P = 1, R = 1/2
    assert p[1, 0, 0] == 1.0 and r[1, 0, 0] == 0.5 and f[1, 0, 0] == pytest.approx(2 / 3)


def test_threshold_chosen_on_validation_reported_on_test():
    rng = np.random.default_rng(0)
    n, L = 40, 30
    lengths = [L] * n
    offsets = np.arange(n) * L
    regions = [(i, "motif", 5, 10) for i in range(n)]
    a = np.zeros((n * L, 2), np.float32)
    for i in range(n):
        a[i * L + 5 : i * L + 10, 0] = 1.0  # latent 0: exactly the motif
        a[i * L : (i + 1) * L, 1] = 0.3  # latent 1: weak everywhere
        a[i * L + rng.integers(0, L), 1] = 1.0
    val = np.arange(n) % 2 == 0
    res = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, thresholds=(0.0, 0.5))
    assert res.concepts == ["motif"]
    assert res.test_f1[0, 0] == 1.0 and res.associated[0, 0]
    assert not res.associated[1, 0]
    s = concepts.summarize(res, np.ones(2, bool))
    assert s["n_associated_latents"] == 1 and s["n_concepts_covered"] == 1


def test_validation_choice_is_not_peeked_from_test():
    n, L = 20, 20
    lengths = [L] * n
    offsets = np.arange(n) * L
    regions = [(i, "m", 5, 10) for i in range(n)]
    val = np.arange(n) < 10
    a = np.zeros((n * L, 1), np.float32)
    for i in range(n):
        a[i * L + 5 : i * L + 10, 0] = 1.0
        # outside-region noise at 0.3: on validation it is absent, on test it is present, so the
        # best test threshold (0.5) differs from the validation choice (0.0, first of the ties)
        if not val[i]:
            a[i * L : i * L + 5, 0] = 0.3
    res = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, thresholds=(0.0, 0.5))
    assert res.threshold[0, 0] == 0.0 and res.val_f1[0, 0] == 1.0
    assert res.test_f1[0, 0] < 1.0


def test_concept_keys():
    assert concepts.concept_key("pfam", "Pfam domain", "PF00069") == "pfam:PF00069"
    assert concepts.concept_key("feature", "SIGNAL", "") == "feature:signal peptide"
    assert concepts.concept_key("feature", "transmembrane region", "") == "feature:transmembrane region"
    assert concepts.concept_key("feature", "CHAIN", "") is None
    assert concepts.concept_key("feature", "HELIX", "") == "secondary structure:helix"
    assert concepts.concept_key("feature", "beta strand", "") == "secondary structure:strand"
    assert concepts.concept_key("secondary_structure", "strand", "CA rule") == "secondary structure:strand"
    rows = [{"accession": "P1", "kind": "feature", "type": "DISULFID", "label": "", "start": 3, "end": 9}]
    assert concepts.regions_from_annotations(rows, {"P1": 0}, [20]) == [
        (0, "feature:disulfide bond", 2, 3), (0, "feature:disulfide bond", 8, 9)]


def test_split_keeps_groups_whole():
    side = concepts.split_validation(np.array(["r1", "r1", "r2", "r3", "r3"], dtype=object), ["a", "b", "c", "d", "e"], seed=0)
    assert side[0] == side[1] and side[3] == side[4]
    many = np.array([f"r{i // 3}" for i in range(300)], dtype=object)
    side = concepts.split_validation(many, [f"p{i}" for i in range(300)], seed=0)
    assert all(len(set(side[many == g])) == 1 for g in set(many)) and 0.3 < side.mean() < 0.7
