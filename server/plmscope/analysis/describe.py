"""Automatic one-line descriptions of latents, from their strongest evidence.

Every description starts with ``AUTO_PREFIX`` and every claim carries its number, e.g.::

    auto: short motif; concept feature:signal peptide (test F1 0.81); family PF00069 Pkinase
    (held-out F1 0.74, precision 0.92); enriched C (x5.2)

Order of evidence: the best concept association (only when associated: test F1 > 0.5), the best
family (shown when family-specific, or when held-out F1 >= ``FAMILY_MENTION_F1``), the activation
pattern, and amino acids enriched among the latent's active residues against the corpus background
(fold >= ``MIN_AA_FOLD`` with >= ``MIN_AA_RESIDUES`` active residues of that amino acid).
"""

from __future__ import annotations

import math
from typing import Sequence

from ..vocab import AMINO_ACIDS, aa_fold

AUTO_PREFIX = "auto: "
FAMILY_MENTION_F1 = 0.3
MIN_AA_FOLD = 2.0
MIN_AA_RESIDUES = 10
MAX_AAS = 3
PATTERN_WORDS = {
    "point": "single residues",
    "short_motif": "short motif",
    "long_motif": "long motif / domain",
    "periodic": "periodic (every 3-4 residues)",
    "whole": "whole protein",
    "dead": "dead",
}


def aa_enrichment(aa_counts: Sequence[int], background: Sequence[int],
                  alphabet: str = AMINO_ACIDS) -> list[tuple[str, float, int]]:
    """(amino acid, fold, active residues) sorted by fold, for enriched amino acids only.

    fold is ``vocab.aa_fold``, the number the latent page charts (as log2); letters with fewer than
    ``MIN_AA_RESIDUES`` active residues are left out, so a handful of residues cannot make a claim.
    """
    fold = aa_fold(aa_counts, background)
    out = [(alphabet[i], float(fold[i]), int(c)) for i, c in enumerate(aa_counts)
           if fold[i] >= MIN_AA_FOLD and c >= MIN_AA_RESIDUES]
    return sorted(out, key=lambda t: -t[1])[:MAX_AAS]


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def describe(
    *,
    pattern: str,
    concept: str | None = None,
    concept_f1: float | None = None,
    family: str | None = None,
    family_name: str = "",
    family_f1: float | None = None,
    family_precision: float | None = None,
    family_specific: bool = False,
    enriched: Sequence[tuple[str, float, int]] = (),
) -> str:
    if pattern == "dead":
        return AUTO_PREFIX + "dead (never active on this corpus)"
    parts = []
    if concept and concept_f1 is not None and math.isfinite(concept_f1):
        parts.append(f"concept {concept} (test F1 {_fmt(concept_f1)})")
    if family and family_f1 is not None and math.isfinite(family_f1) and (family_specific or family_f1 >= FAMILY_MENTION_F1):
        label = f"{family} {family_name}".strip()
        kind = "family-specific" if family_specific else "family"
        prec = f", precision {_fmt(family_precision)}" if family_precision is not None and math.isfinite(family_precision) else ""
        parts.append(f"{kind} {label} (held-out F1 {_fmt(family_f1)}{prec})")
    elif not family_specific:
        parts.append("not family-specific")
    parts.append(PATTERN_WORDS.get(pattern, pattern))
    if enriched:
        parts.append("enriched " + ", ".join(f"{aa} (x{fold:.1f})" for aa, fold, _ in enriched))
    return AUTO_PREFIX + "; ".join(parts)
