from plmscope.analysis import describe


def test_description_carries_numbers_and_is_marked_automatic():
    text = describe.describe(
        pattern="short_motif", concept="feature:signal peptide", concept_f1=0.812,
        family="PF00069", family_name="Pkinase", family_f1=0.74, family_precision=0.9, family_specific=True,
        enriched=[("C", 5.2, 40)],
    )
    assert text.startswith(describe.AUTO_PREFIX)
    assert "signal peptide (test F1 0.81)" in text
    assert "PF00069 Pkinase (held-out F1 0.74, precision 0.90)" in text
    assert "C (x5.2)" in text and "short motif" in text
    assert describe.describe(pattern="dead").startswith("auto: dead")


def test_aa_enrichment():
    bg = [100] * 20
    counts = [0] * 20
    counts[1] = 50  # C
    counts[0] = 5
    out = describe.aa_enrichment(counts, bg)
    assert [aa for aa, _, _ in out] == ["C"] and out[0][1] > 2
