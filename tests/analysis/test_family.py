import numpy as np
from scipy import sparse

from plmscope.analysis import family
from plmscope.vocab import AMINO_ACIDS


def make_corpus(n=400, seed=0):
    rng = np.random.default_rng(seed)
    fams = []
    for i in range(n):
        if i % 4 == 0:
            fams.append(["PF00001"])
        elif i % 4 == 1:
            fams.append(["PF00002", "PF00003"])
        else:
            fams.append([])
    seqs = ["".join(rng.choice(list(AMINO_ACIDS), 60)) for _ in range(n)]
    return fams, seqs


def test_latent_on_exactly_one_family_is_specific_with_f1_1():
    fams, seqs = make_corpus()
    n = len(fams)
    rng = np.random.default_rng(1)
    M = np.zeros((n, 3), np.float32)
    M[:, 0] = [rng.uniform(1, 5) if "PF00001" in f else 0 for f in fams]  # exactly family 1
    M[:, 1] = rng.uniform(0, 5, n) * (rng.random(n) < 0.5)  # fires at random: general
    # latent 2 fires strongly on PF00002 and weakly on everything else: needs a threshold > 0
    M[:, 2] = [4.0 if "PF00002" in f else 0.3 for f in fams]
    res = family.family_specificity(sparse.csr_matrix(M), fams, seqs, seed=0)
    assert res.family[0] == "PF00001"
    assert res.f1[0] == 1.0 and res.precision[0] == 1.0 and res.recall[0] == 1.0 and res.auc[0] == 1.0
    assert res.specific[0]
    assert not res.specific[1]
    # PF00002 and PF00003 always co-occur: the tie goes to the first, either is right
    assert res.family[2] in {"PF00002", "PF00003"} and res.fraction[2] > 0 and res.f1[2] == 1.0
    s = family.summarize(res, np.ones(3, bool))
    assert s["n_family_specific"] == 2 and s["n_general"] == 1


def test_split_is_disjoint_deterministic_and_keeps_identical_sequences_together():
    keys = [f"SEQ{i % 50}" for i in range(200)]  # every sequence 4 times
    a = family.split_halves(keys, seed=3)
    b = family.split_halves(list(reversed(keys)), seed=3)[::-1]
    assert (a == b).all()
    for k in set(keys):
        sides = {a[i] for i in range(200) if keys[i] == k}
        assert len(sides) == 1
    assert 0.2 < a.mean() < 0.8
    assert (family.split_halves(keys, seed=4) != a).any()


def test_threshold_and_family_come_from_the_selection_half_only():
    fams, seqs = make_corpus(200)
    sel = family.split_halves(seqs, seed=0)
    M = np.zeros((200, 1), np.float32)
    # selection half: the latent marks PF00001; held-out half: it marks PF00002 instead.
    for i, f in enumerate(fams):
        if sel[i] and "PF00001" in f or (not sel[i]) and "PF00002" in f:
            M[i, 0] = 2.0
    res = family.family_specificity(sparse.csr_matrix(M), fams, seqs, seed=0)
    assert res.family[0] == "PF00001"  # chosen where it was chosen ...
    assert res.selection_f1[0] == 1.0
    assert res.f1[0] == 0.0 and not res.specific[0]  # ... and judged where it was not


def test_the_threshold_scale_comes_from_the_selection_half():
    fams, seqs = make_corpus(200)
    sel = family.split_halves(seqs, seed=0)
    M = np.zeros((200, 1), np.float32)
    for i, f in enumerate(fams):
        M[i, 0] = (2.0 if "PF00001" in f else 0.3) if sel[i] else (2.0 if "PF00001" in f else 0.3)
    base = family.family_specificity(sparse.csr_matrix(M), fams, seqs, seed=0)
    # one held-out protein fires 100x harder: the scale, so the chosen threshold, must not move
    M[np.flatnonzero(~sel)[0], 0] = 200.0
    res = family.family_specificity(sparse.csr_matrix(M), fams, seqs, seed=0)
    assert res.family[0] == base.family[0] == "PF00001" and res.fraction[0] == base.fraction[0] > 0
    assert res.selection_f1[0] == base.selection_f1[0] == 1.0


def test_a_family_without_held_out_members_is_counted_as_no_evidence():
    # PF00009 sits only in the selection half: a latent on it can be chosen but not judged
    fams, seqs = make_corpus(200)
    sel = family.split_halves(seqs, seed=0)
    fams = [f + (["PF00009"] if sel[i] and i % 4 == 2 else []) for i, f in enumerate(fams)]
    M = np.zeros((200, 2), np.float32)
    M[:, 0] = ["PF00009" in f for f in fams]
    M[:, 1] = ["PF00001" in f for f in fams]
    res = family.family_specificity(sparse.csr_matrix(M), fams, seqs, seed=0)
    assert res.family[0] == "PF00009" and res.n_heldout_members[0] == 0 and np.isnan(res.f1[0])
    assert res.n_heldout_members[1] > 0 and res.n_heldout_active[1] == res.n_heldout_members[1] and res.specific[1]
    s = family.summarize(res, np.ones(2, bool))
    assert s["n_no_heldout_evidence"] == 1 and s["n_general"] == 0 and s["n_family_specific"] == 1
