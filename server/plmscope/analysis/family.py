"""Family specificity: which protein family best predicts "the latent is active on the protein".

Proteins are split into two halves (``split_halves``).  For every latent, a protein counts as
*active* when its maximum activation exceeds a fraction (``FRACTIONS``; 0 means any activation) of
the latent's maximum over the *selection* half, so the held-out proteins do not set the scale the
threshold is a fraction of:

* on the **selection** half, the (family, fraction) pair with the highest F1 of "active" vs "member
  of the family" is chosen, over all families with >= ``MIN_FAMILY_MEMBERS`` members there;
* on the **held-out** half, precision, recall and F1 of that pair, and the ROC-AUC of the protein
  maximum as a score for membership, are reported (sklearn).  Nothing reported is computed on the
  proteins used to choose.

Rule (``is_family_specific``): a latent is *family-specific* when it is active on at least
``MIN_ACTIVE_PROTEINS`` selection proteins and its held-out F1 >= ``SPECIFIC_MIN_F1`` and held-out
precision >= ``SPECIFIC_MIN_PRECISION`` (most proteins it fires on belong to the family, and it
finds a good part of the family).  Other latents active on enough proteins are *general*; latents
active on fewer are *rare* (too little evidence either way).  A latent whose chosen family has no
held-out member, or that fires on no held-out protein, cannot be judged on the held-out half
(``n_heldout_members`` / ``n_heldout_active``; counted as ``n_no_heldout_evidence``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import sparse
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75)  # of the latent's max over the selection half
MIN_FAMILY_MEMBERS = 3  # in the selection half; a 1-member family would win F1 = 1 by chance
MIN_ACTIVE_PROTEINS = 5  # selection proteins the latent must be active on to be judged
SPECIFIC_MIN_F1 = 0.5
SPECIFIC_MIN_PRECISION = 0.7


def split_halves(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """Boolean mask: True = selection half, False = held-out half.

    Decided by a seeded SHA-256 of each key, so the split does not depend on row order or on
    the other proteins.  Analyze passes each protein's MMseqs2 cluster representative as key: a
    whole homology cluster then lands in one half and homologues cannot leak the answer across it.
    """
    out = np.empty(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        out[i] = digest[0] & 1 == 0
    return out


def family_matrix(families: Sequence[Sequence[str]]) -> tuple[sparse.csr_matrix, list[str]]:
    """(n_proteins x n_families) 0/1 membership matrix and the family names (sorted)."""
    names = sorted({f for fams in families for f in fams})
    index = {f: j for j, f in enumerate(names)}
    rows, cols = [], []
    for i, fams in enumerate(families):
        for f in set(fams):
            rows.append(i)
            cols.append(index[f])
    data = np.ones(len(rows), dtype=np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(families), len(names))), names


def normalise(protein_max: sparse.spmatrix, latent_max: np.ndarray) -> sparse.csr_matrix:
    """Protein maxima divided by each latent's ``latent_max`` (latents with max 0 stay 0)."""
    lmax = np.asarray(latent_max, dtype=np.float64)
    inv = np.divide(1.0, lmax, out=np.zeros_like(lmax), where=lmax > 0)
    return sparse.csr_matrix(protein_max @ sparse.diags(inv.astype(np.float32)))


@dataclass
class FamilyResult:
    """Per-latent arrays (length d_sae); family None where no family could be chosen."""

    family: list[str | None]
    fraction: np.ndarray  # chosen threshold as a fraction of the latent max (NaN if none)
    selection_f1: np.ndarray
    n_active_selection: np.ndarray  # selection proteins with any activation
    precision: np.ndarray  # held-out; NaN when undefined
    recall: np.ndarray
    f1: np.ndarray
    auc: np.ndarray
    specific: np.ndarray  # bool
    n_heldout_members: np.ndarray  # held-out proteins of the chosen family (0 without one)
    n_heldout_active: np.ndarray  # held-out proteins active at the chosen threshold
    selection: np.ndarray = field(repr=False)  # the protein split used (True = selection)


def is_family_specific(f1: float, precision: float, n_active_selection: int) -> bool:
    return bool(
        n_active_selection >= MIN_ACTIVE_PROTEINS
        and np.isfinite(f1)
        and f1 >= SPECIFIC_MIN_F1
        and precision >= SPECIFIC_MIN_PRECISION
    )


def family_specificity(
    protein_max: sparse.spmatrix,
    families: Sequence[Sequence[str]],
    split_keys: Sequence[str],
    *,
    seed: int = 0,
    fractions: Sequence[float] = FRACTIONS,
    min_family_members: int = MIN_FAMILY_MEMBERS,
) -> FamilyResult:
    """Choose family + threshold per latent on the selection half, score it on the held-out half.

    ``protein_max``: (n_proteins x d_sae) protein maximum activations (0 = not active).
    """
    n, d = protein_max.shape
    selection = split_halves(split_keys, seed)
    sel_rows = np.flatnonzero(selection)
    held_rows = np.flatnonzero(~selection)
    protein_max = sparse.csr_matrix(protein_max)
    sel_max = protein_max[sel_rows].max(axis=0).toarray().ravel() if len(sel_rows) else np.zeros(d)
    pn = normalise(protein_max, sel_max)
    fam, names = family_matrix(families)

    f_sel = fam[sel_rows]
    fam_size = np.asarray(f_sel.sum(axis=0)).ravel()
    eligible = np.flatnonzero(fam_size >= min_family_members)
    pn_sel = pn[sel_rows]

    best_f1 = np.full(d, -1.0)
    best_frac = np.full(d, np.nan)
    best_fam = np.full(d, -1, dtype=np.int64)
    if len(eligible):
        f_el = f_sel[:, eligible].tocsc()
        size_el = fam_size[eligible]
        for frac in fractions:
            active = (pn_sel > frac).astype(np.float32)  # sparse; scalar > 0 keeps it sparse
            n_act = np.asarray(active.sum(axis=0)).ravel()
            # F1 of every (latent, family) pair at once from the confusion counts; the grid search
            # needs all pairs, so the counting is vectorised here and sklearn scores the winner.
            tp = (active.T @ f_el).toarray()
            denom = n_act[:, None] + size_el[None, :]
            f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=np.float64), where=denom > 0)
            j = f1.argmax(axis=1)
            top = f1[np.arange(d), j]
            better = top > best_f1 + 1e-12
            best_f1[better] = top[better]
            best_frac[better] = frac
            best_fam[better] = eligible[j[better]]
    n_active_sel = np.asarray((pn_sel > 0).sum(axis=0)).ravel()
    chosen = (best_f1 > 0) & (n_active_sel > 0)

    precision = np.full(d, np.nan)
    recall = np.full(d, np.nan)
    f1_out = np.full(d, np.nan)
    auc = np.full(d, np.nan)
    n_members = np.zeros(d, np.int64)
    n_held_active = np.zeros(d, np.int64)
    pn_held = pn[held_rows].tocsc()
    fam_held = fam[held_rows].tocsc()
    for lat in np.flatnonzero(chosen):
        y_true = fam_held[:, best_fam[lat]].toarray().ravel() > 0
        score = pn_held[:, lat].toarray().ravel()
        y_pred = score > best_frac[lat]
        n_members[lat], n_held_active[lat] = y_true.sum(), y_pred.sum()
        if not y_true.any():
            continue  # the chosen family has no held-out member: nothing to report
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="binary", zero_division=0)
        # active on no held-out protein: recall and F1 are 0, precision is undefined (not 0)
        precision[lat], recall[lat], f1_out[lat] = (p if y_pred.any() else np.nan), r, f
        if not y_true.all():
            auc[lat] = roc_auc_score(y_true, score)

    family = [names[best_fam[i]] if chosen[i] else None for i in range(d)]
    specific = np.array(
        [is_family_specific(f1_out[i], precision[i], n_active_sel[i]) for i in range(d)], dtype=bool
    )
    return FamilyResult(
        family=family,
        fraction=np.where(chosen, best_frac, np.nan),
        selection_f1=np.where(chosen, best_f1, np.nan),
        n_active_selection=n_active_sel,
        precision=precision,
        recall=recall,
        f1=f1_out,
        auc=auc,
        specific=specific,
        n_heldout_members=n_members,
        n_heldout_active=n_held_active,
        selection=selection,
    )


def summarize(result: FamilyResult, live: np.ndarray) -> dict:
    """Counts for the layer: family-specific / general / rare among live latents."""
    live = np.asarray(live, dtype=bool)
    judged = live & (result.n_active_selection >= MIN_ACTIVE_PROTEINS)
    specific = live & result.specific
    # judged on selection, but the held-out half has nothing to judge it on
    no_evidence = judged & ~result.specific & ((result.n_heldout_members == 0) | (result.n_heldout_active == 0))
    fams = {result.family[i] for i in np.flatnonzero(specific)}
    return {
        "n_live": int(live.sum()),
        "n_family_specific": int(specific.sum()),
        "n_general": int((judged & ~result.specific & ~no_evidence).sum()),
        "n_no_heldout_evidence": int(no_evidence.sum()),
        "n_rare": int((live & ~judged).sum()),
        "n_families_with_specific_latent": len(fams),
        "n_selection_proteins": int(result.selection.sum()),
        "n_heldout_proteins": int((~result.selection).sum()),
        "rule": (
            f"family-specific: active on >= {MIN_ACTIVE_PROTEINS} selection proteins, held-out "
            f"F1 >= {SPECIFIC_MIN_F1} and precision >= {SPECIFIC_MIN_PRECISION}"
        ),
    }
