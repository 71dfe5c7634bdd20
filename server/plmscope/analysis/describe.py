"""Automatic one-line descriptions of latents, from selection data only, every number with its set.

Every description starts with ``AUTO_PREFIX``, e.g.::

    auto: concept feature:signal peptide (validation F1 0.71; test F1 0.66 [0.52, 0.78]);
    family-specific PF00069 Pkinase (held-out precision 0.92, held-out F1 0.74); short motif;
    enriched C (x5.2) (all corpus residues)

Evidence, in order:

* **Concept** (``choose_concept``): among the latent's associated concepts (InterPLM's rule,
  ``concepts`` module), the one with the highest *validation* F1, never the highest test F1; shown
  with its validation F1, its test F1 and the test F1's bootstrap 95 % interval.  Where no concept
  is associated but one passes validation (F1 > 0.5) with fewer than ``concepts.MIN_PER_SPLIT``
  regions (or residues) in a split: "not enough evidence", with the counts.
* **Family** (``describe_family``): named only where the latent's held-out precision for it is
  >= ``FAMILY_MENTION_PRECISION`` (most held-out proteins it fires on are in the family) and it is
  family-specific or its held-out F1 >= ``FAMILY_MENTION_F1``.  "not enough evidence" where the
  held-out half cannot judge: the family has no held-out member, the latent fires on no held-out
  protein, or it fires on fewer than ``family.MIN_ACTIVE_PROTEINS`` selection proteins.
* The activation **pattern**, and amino acids **enriched** among the latent's active residues
  against the corpus background (fold >= ``MIN_AA_FOLD`` with >= ``MIN_AA_RESIDUES`` active
  residues of that amino acid), counted over the whole corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..vocab import AMINO_ACIDS, aa_fold
from . import concepts as concepts_mod
from . import family as family_mod

AUTO_PREFIX = "auto: "
FAMILY_MENTION_PRECISION = 0.5  # held-out precision a family needs to be named
FAMILY_MENTION_F1 = 0.3  # ... and held-out F1, unless the latent is family-specific
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


@dataclass(frozen=True)
class ConceptEvidence:
    """One (latent, concept) pair as the association measured it."""

    concept: str
    val_f1: float
    test_f1: float
    test_f1_lo: float  # bootstrap 95 % interval of test F1 (NaN when not computed)
    test_f1_hi: float
    n_val: int  # regions (residue-level concepts: residues) in each split
    n_test: int
    residue_level: bool
    associated: bool

    @property
    def enough(self) -> bool:
        return min(self.n_val, self.n_test) >= concepts_mod.MIN_PER_SPLIT


@dataclass(frozen=True)
class FamilyEvidence:
    """A latent's best family (chosen on the selection half) and its held-out numbers."""

    family: str | None
    name: str = ""
    precision: float = math.nan  # held-out
    f1: float = math.nan  # held-out
    specific: bool = False
    n_active_selection: int = 0  # selection proteins the latent fires on
    n_heldout_members: int = 0  # held-out proteins of the family
    n_heldout_active: int = 0  # held-out proteins the latent fires on at the chosen threshold


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


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def choose_concept(candidates: Sequence[ConceptEvidence]) -> ConceptEvidence | None:
    """The concept a description names: the associated one with the highest validation F1; else
    the best-by-validation concept that passes validation but has too few regions to be tested
    (described as "not enough evidence"); else None.  Test F1 never ranks."""
    associated = [c for c in candidates if c.associated]
    if associated:
        return max(associated, key=lambda c: (c.val_f1, c.concept))
    short = [c for c in candidates if c.val_f1 > concepts_mod.ASSOCIATION_F1 and not c.enough]
    return max(short, key=lambda c: (c.val_f1, c.concept)) if short else None


def describe_concept(c: ConceptEvidence) -> str:
    unit = "residue" if c.residue_level else "region"
    if not c.associated:
        return (f"concept {c.concept}: not enough evidence (validation F1 {_fmt(c.val_f1)}; {c.n_val} validation / "
                f"{_n(c.n_test, 'test ' + unit)}, {concepts_mod.MIN_PER_SPLIT} needed in each)")
    ci = f" [{_fmt(c.test_f1_lo)}, {_fmt(c.test_f1_hi)}]" if math.isfinite(c.test_f1_lo) and math.isfinite(c.test_f1_hi) else ""
    return f"concept {c.concept} (validation F1 {_fmt(c.val_f1)}; test F1 {_fmt(c.test_f1)}{ci})"


def describe_family(f: FamilyEvidence) -> str:
    if f.n_active_selection < family_mod.MIN_ACTIVE_PROTEINS:
        return (f"family: not enough evidence (active on {_n(f.n_active_selection, 'selection protein')}, "
                f"{family_mod.MIN_ACTIVE_PROTEINS} needed)")
    if f.family is None:
        return "not family-specific (no family fits on the selection proteins)"
    if f.n_heldout_members == 0:
        return "family: not enough evidence (its best family has no held-out member)"
    if f.n_heldout_active == 0 or not math.isfinite(f.precision):
        return "family: not enough evidence (active on no held-out protein)"
    if f.precision >= FAMILY_MENTION_PRECISION and (f.specific or (math.isfinite(f.f1) and f.f1 >= FAMILY_MENTION_F1)):
        label = f"{f.family} {f.name}".strip()
        kind = "family-specific" if f.specific else "family"
        return f"{kind} {label} (held-out precision {_fmt(f.precision)}, held-out F1 {_fmt(f.f1)})"
    return f"not family-specific (best family's held-out precision {_fmt(f.precision)}, held-out F1 {_fmt(f.f1)})"


def describe(
    *,
    pattern: str,
    concept: ConceptEvidence | None = None,
    family: FamilyEvidence | None = None,
    enriched: Sequence[tuple[str, float, int]] = (),
) -> str:
    if pattern == "dead":
        return AUTO_PREFIX + "dead (never active on this corpus)"
    parts = []
    if concept is not None:
        parts.append(describe_concept(concept))
    if family is not None:
        parts.append(describe_family(family))
    parts.append(PATTERN_WORDS.get(pattern, pattern))
    if enriched:
        # folds are over all corpus residues: no threshold or choice was fitted to them
        parts.append("enriched " + ", ".join(f"{aa} (x{fold:.1f})" for aa, fold, _ in enriched) + " (all corpus residues)")
    return AUTO_PREFIX + "; ".join(parts)
