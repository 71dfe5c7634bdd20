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


def _ones(n_latents):
    return np.ones(n_latents, np.float32)


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
    res = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, scale=_ones(2), thresholds=(0.0, 0.5))
    assert res.concepts == ["motif"] and res.n_val[0] == res.n_test[0] == 20
    assert res.val_f1[0, 0] == res.test_f1[0, 0] == 1.0 and res.associated[0, 0]
    assert not res.associated[1, 0]
    s = concepts.summarize(res, np.ones(2, bool))
    assert s["n_associated_latents"] == 1 and s["n_associated_concepts"] == 1 and s["n_associated_pairs"] == 1


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
    res = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, scale=_ones(1), thresholds=(0.0, 0.5))
    assert res.threshold[0, 0] == 0.0 and res.val_f1[0, 0] == 1.0
    assert res.test_f1[0, 0] < 1.0


def _two_split_case(n=40, L=30):
    """n proteins, the first half validation, each with one 'motif' region at residues 10..15."""
    lengths = [L] * n
    offsets = np.arange(n) * L
    regions = [(i, "motif", 10, 15) for i in range(n)]
    val = np.arange(n) < n // 2
    return lengths, offsets, regions, val


def test_interplm_rule_needs_validation_and_test():
    lengths, offsets, regions, val = _two_split_case()
    n, L = len(lengths), lengths[0]
    a = np.zeros((n * L, 3), np.float32)
    for i in range(n):
        motif, outside = slice(i * L + 10, i * L + 15), slice(i * L + 20, i * L + 25)
        # latent 0 fails validation (fires beside the motif) and passes test (fires on it)
        a[outside if val[i] else motif, 0] = 1.0
        # latent 1 the reverse
        a[motif if val[i] else outside, 1] = 1.0
        # latent 2 passes both
        a[motif, 2] = 1.0
    res = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, scale=_ones(3))
    # the old rule (test F1 > 0.5 alone) would have associated latent 0
    assert res.val_f1[0, 0] <= 0.5 < res.test_f1[0, 0] and not res.associated[0, 0]
    assert res.test_f1[1, 0] <= 0.5 < res.val_f1[1, 0] and not res.associated[1, 0]
    assert res.associated[2, 0]
    assert res.associated[:, 0].tolist() == [False, False, True]
    s = concepts.summarize(res, np.ones(3, bool))
    assert s["n_associated_pairs"] == 1 and s["n_pairs_passing_validation"] == 2


def test_at_least_ten_regions_in_each_split():
    a_perfect = lambda n, L: np.tile(np.r_[np.zeros(10), np.ones(5), np.zeros(L - 15)], n)[:, None].astype(np.float32)  # noqa: E731
    for n, expected in ((18, False), (20, True)):  # 9 or 10 regions per split
        lengths, offsets, regions, val = _two_split_case(n)
        res = concepts.associate(sparse.csr_matrix(a_perfect(n, lengths[0])), offsets, lengths, regions, val, scale=_ones(1))
        assert res.concepts == ["motif"] and res.val_f1[0, 0] == res.test_f1[0, 0] == 1.0  # scored either way
        assert res.enough[0] == expected and res.associated[0, 0] == expected


def test_residue_level_concepts_count_and_recall_residues():
    # 8 proteins, 4 per split, each with one 3-residue annotation of a residue-level concept (modified
    # residue) and of a region-level one: 12 residues but 4 regions per split.
    n, L = 8, 20
    lengths, offsets = [L] * n, np.arange(n) * L
    val = np.arange(n) < 4
    regions = [(i, c, 5, 8) for i in range(n) for c in ("feature:modified residue", "feature:repeat")]
    a = np.zeros((n * L, 1), np.float32)
    a[offsets + 5, 0] = 1.0  # the first residue of each annotation only
    res = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, scale=_ones(1), min_per_split=10)
    mod, rep = res.concepts.index("feature:modified residue"), res.concepts.index("feature:repeat")
    assert res.residue_level[mod] and not res.residue_level[rep]
    assert res.n_val[mod] == res.n_test[mod] == 12 and res.n_val[rep] == res.n_test[rep] == 4
    assert res.enough[mod] and not res.enough[rep]
    assert res.test_recall[0, mod] == pytest.approx(1 / 3) and res.test_recall[0, rep] == 1.0
    assert res.test_precision[0, mod] == res.test_precision[0, rep] == 1.0


def test_normalising_max_leaves_the_test_clusters_out():
    # proteins 0-3; clusters A (0, 1), B (2), C (3); test split = cluster C.  Protein 3 (test)
    # holds the largest activation; protein 1 is in a validation cluster.
    pm = sparse.csr_matrix(np.array([[1.0, 0.0], [2.0, 0.5], [0.5, 0.0], [9.0, 7.0]], np.float32))
    groups = np.array(["A", "A", "B", "C"], dtype=object)
    assert concepts.normalising_max(pm, groups, ["C"]).tolist() == [2.0, 0.5]
    # a protein outside the concept subset but in a test cluster is left out too
    assert concepts.normalising_max(pm, groups, ["A", "C"]).tolist() == [0.5, 0.0]
    assert concepts.normalising_max(pm, groups, ["A", "B", "C"]).tolist() == [0.0, 0.0]


def test_a_test_protein_holding_the_max_does_not_move_the_thresholds():
    lengths, offsets, regions, val = _two_split_case()
    n, L = len(lengths), lengths[0]
    a = np.full((n * L, 1), 0.3, np.float32)  # weak everywhere ...
    for i in range(n):
        a[i * L + 10 : i * L + 15, 0] = 1.0  # ... strong on the motif
    a[np.flatnonzero(~val)[0] * L + 12, 0] = 10.0  # one test residue holds the maximum
    pm = sparse.csr_matrix(np.array([a[i * L : (i + 1) * L, 0].max() for i in range(n)], np.float32)[:, None])
    groups = np.array([f"c{i}" for i in range(n)], dtype=object)
    scale = concepts.normalising_max(pm, groups, groups[~val])
    assert scale[0] == 1.0
    res = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, scale=scale, groups=groups)
    assert res.associated[0, 0] and res.scale[0] == 1.0
    # with the maximum over all proteins the motif sits below every non-zero threshold: not associated
    everywhere = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, val, scale=np.array([10.0]))
    assert not everywhere.associated[0, 0]


def _noisy_case(n, seed=0, L=30):
    """A latent that finds each motif with probability 0.75 and fires off-motif now and then."""
    rng = np.random.default_rng(seed)
    lengths, offsets, regions, val = _two_split_case(n, L)
    a = np.zeros((n * L, 1), np.float32)
    for i in range(n):
        if rng.random() < 0.75:
            a[i * L + 10 : i * L + 15, 0] = 1.0
        if rng.random() < 0.4:
            a[i * L + 20 : i * L + 24, 0] = 1.0
    return sparse.csr_matrix(a), offsets, lengths, regions, val


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data():
    widths = []
    for n in (40, 400):
        a, offsets, lengths, regions, val = _noisy_case(n)
        res = concepts.associate(a, offsets, lengths, regions, val, scale=_ones(1), seed=1)
        lo, f1, hi = res.test_f1_lo[0, 0], res.test_f1[0, 0], res.test_f1_hi[0, 0]
        assert res.reported[0, 0] and 0 <= lo <= f1 <= hi <= 1 and lo < hi
        widths.append(hi - lo)
        again = concepts.associate(a, offsets, lengths, regions, val, scale=_ones(1), seed=1)
        assert (again.test_f1_lo[0, 0], again.test_f1_hi[0, 0]) == (lo, hi)  # seeded
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(10) of the width


def test_bootstrap_resamples_whole_clusters():
    a, offsets, lengths, regions, val = _noisy_case(60)
    # every test protein in one cluster: each resample draws that cluster, so the interval is the estimate
    groups = np.where(val, np.arange(60).astype(str), "one")
    res = concepts.associate(a, offsets, lengths, regions, val, scale=_ones(1), groups=groups)
    assert res.n_test_clusters == 1
    assert res.test_f1_lo[0, 0] == pytest.approx(res.test_f1[0, 0]) == pytest.approx(res.test_f1_hi[0, 0])
    per_protein = concepts.associate(a, offsets, lengths, regions, val, scale=_ones(1))
    assert per_protein.n_test_clusters == 30 and per_protein.test_f1_hi[0, 0] > per_protein.test_f1_lo[0, 0]


def test_reported_pairs_rank_by_validation_f1():
    val_f1 = np.array([[0.9, 0.1, 0.3, 0.25]])
    assoc = np.array([[False, True, False, False]])
    got = concepts.reported_pairs(val_f1, assoc, per_latent=2, min_val_f1=0.2)
    assert got.tolist() == [[True, True, True, False]]  # best two by validation F1, plus the associated one


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


def test_secondary_structure_is_scored_only_on_proteins_that_have_it():
    """A helix latent fires on the helices of every protein, but only 40 of 120 proteins have a
    structure: scored over all 120 its precision is about 1/3 (not associated); over the 40 with
    secondary structure it is exact (associated).  A motif present in all proteins is scored on all."""
    from plmscope.analysis.run import _associate_by_universe

    n, L = 120, 30
    lengths = np.full(n, L)
    offsets = np.arange(n) * L
    a = np.zeros((n * L, 2), np.float32)
    regions = []
    for i in range(n):
        a[i * L + 10 : i * L + 20, 0] = 1.0  # latent 0: the helix of every protein
        a[i * L + 2 : i * L + 5, 1] = 1.0  # latent 1: a motif annotated everywhere
        regions.append((i, "motif", 2, 5))
        if i < 40:
            regions.append((i, "secondary structure:helix", 10, 20))
    validation = np.arange(n) % 2 == 0
    groups = np.array([f"c{i}" for i in range(n)], dtype=object)
    everywhere = concepts.associate(sparse.csr_matrix(a), offsets, lengths, regions, validation, scale=_ones(2),
                                    groups=groups, n_boot=0)
    assert not everywhere.associated[0, everywhere.concepts.index("secondary structure:helix")]
    res, n_ss = _associate_by_universe(sparse.csr_matrix(a), offsets, lengths, regions, validation, _ones(2), groups, 0)
    assert n_ss == 40 and res.concepts == ["motif", "secondary structure:helix"]
    assert res.associated[0, 1] and res.test_f1[0, 1] == pytest.approx(1.0)
    assert res.associated[1, 0] and not res.associated[1, 1]
    assert res.val_f1.shape == (2, 2) and res.n_val.shape == (2,)
