import math
import re

from plmscope.analysis import describe
from plmscope.analysis.describe import ConceptEvidence, FamilyEvidence


def _concept(name, val_f1, test_f1, *, n_val=20, n_test=20, associated=None, lo=None, hi=None):
    enough = min(n_val, n_test) >= 10
    return ConceptEvidence(
        concept=name, val_f1=val_f1, test_f1=test_f1, test_f1_lo=test_f1 - 0.1 if lo is None else lo,
        test_f1_hi=min(test_f1 + 0.1, 1.0) if hi is None else hi, n_val=n_val, n_test=n_test, residue_level=False,
        associated=(val_f1 > 0.5 and test_f1 > 0.5 and enough) if associated is None else associated)


PKINASE = FamilyEvidence(family="PF00069", name="Pkinase", precision=0.92, f1=0.74, specific=True,
                         n_active_selection=40, n_heldout_members=30, n_heldout_active=25)


def test_description_carries_numbers_with_their_sets_and_is_marked_automatic():
    text = describe.describe(
        pattern="short_motif", concept=_concept("feature:signal peptide", 0.712, 0.661, lo=0.52, hi=0.78),
        family=PKINASE, enriched=[("C", 5.2, 40)],
    )
    assert text.startswith(describe.AUTO_PREFIX)
    assert "concept feature:signal peptide (validation F1 0.71; test F1 0.66 [0.52, 0.78])" in text
    assert "family-specific PF00069 Pkinase (held-out precision 0.92, held-out F1 0.74)" in text
    assert "C (x5.2)" in text and "short motif" in text
    # every F1 / precision printed says which proteins it was measured on
    metrics = re.findall(r"([\w-]+) (F1|precision) \d", text)
    assert metrics and all(s in {"validation", "test", "held-out"} for s, _ in metrics), metrics
    assert describe.describe(pattern="dead").startswith("auto: dead")


def test_concept_is_chosen_by_validation_f1_not_test_f1():
    by_val = _concept("pfam:PF00001", 0.90, 0.60)
    by_test = _concept("feature:transmembrane region", 0.70, 0.95)
    assert describe.choose_concept([by_test, by_val]) is by_val
    text = describe.describe(pattern="long_motif", concept=describe.choose_concept([by_test, by_val]))
    assert "pfam:PF00001" in text and "transmembrane" not in text
    # a pair that passed validation but not test is never named when an associated one exists,
    # and never named as an association
    failed = _concept("feature:zinc finger", 0.99, 0.30)
    assert describe.choose_concept([failed, by_test]) is by_test
    assert describe.choose_concept([failed]) is None


def test_too_few_regions_is_not_enough_evidence():
    short = _concept("feature:zinc finger", 0.95, 0.90, n_val=12, n_test=4)
    assert not short.associated
    chosen = describe.choose_concept([short])
    assert chosen is short
    text = describe.describe(pattern="short_motif", concept=chosen)
    assert "concept feature:zinc finger: not enough evidence (validation F1 0.95; 12 validation / 4 test regions, 10 needed in each)" in text
    assert "test F1" not in text  # a test F1 on 4 regions is not quoted


def test_family_without_held_out_evidence_is_not_enough_evidence():
    no_member = FamilyEvidence(family="PF00001", name="7tm_1", precision=math.nan, f1=math.nan,
                               n_active_selection=12, n_heldout_members=0, n_heldout_active=3)
    text = describe.describe(pattern="whole", family=no_member)
    assert "family: not enough evidence (its best family has no held-out member)" in text
    assert "not family-specific" not in text and "PF00001" not in text
    silent = FamilyEvidence(family="PF00001", precision=math.nan, f1=0.0, n_active_selection=12,
                            n_heldout_members=5, n_heldout_active=0)
    assert "not enough evidence (active on no held-out protein)" in describe.describe(pattern="whole", family=silent)
    rare = FamilyEvidence(family="PF00001", precision=1.0, f1=1.0, n_active_selection=2, n_heldout_members=5,
                          n_heldout_active=2)
    assert "not enough evidence (active on 2 selection proteins, 5 needed)" in describe.describe(pattern="whole", family=rare)


def test_family_is_named_only_with_held_out_precision_of_at_least_half():
    loose = FamilyEvidence(family="PF00005", name="ABC_tran", precision=0.29, f1=0.45, specific=False,
                           n_active_selection=50, n_heldout_members=20, n_heldout_active=40)
    text = describe.describe(pattern="long_motif", family=loose)
    assert "PF00005" not in text and "ABC_tran" not in text
    assert "not family-specific (best family's held-out precision 0.29, held-out F1 0.45)" in text
    half = FamilyEvidence(family="PF00005", name="ABC_tran", precision=0.5, f1=0.45, specific=False,
                          n_active_selection=50, n_heldout_members=20, n_heldout_active=18)
    assert "family PF00005 ABC_tran (held-out precision 0.50, held-out F1 0.45)" in describe.describe(pattern="long_motif", family=half)


def test_aa_enrichment():
    bg = [100] * 20
    counts = [0] * 20
    counts[1] = 50  # C
    counts[0] = 5
    out = describe.aa_enrichment(counts, bg)
    assert [aa for aa, _, _ in out] == ["C"] and out[0][1] > 2
