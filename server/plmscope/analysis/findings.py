"""The paper's findings, tested on this atlas: InterProt (Adams, Bai, Lee, Yu & AlQuraishi 2025,
"From mechanistic interpretability to mechanistic biology") makes claims about SAE latents of a
pLM across layers; each ``FINDINGS`` entry states one, the test run here and its verdict.

Everything is read from the atlas's own tables after ``plmscope analyze`` has analysed its SAEs, so
the findings cover every analysed SAE of the pLM with the most analysed layers (SAEs of one layer
are pooled).  Verdicts:

* ``reproduced``: the interval of the test lies wholly on the claimed side;
* ``not reproduced``: the test ran and it does not (its numbers say by how much);
* ``not enough evidence``: too few layers, latents or annotations for the test to run;
* ``measured`` / ``not tested``: the descriptive sweep finding, with or without a recorded sweep.

Tests (95 % intervals; latents of a layer are treated as independent draws, which they are not
quite, so the intervals are optimistic):

``family_middle``  family-specific latents are most common in middle layers.  Per layer: the share
    of live latents that are family-specific (``family.py``'s held-out rule), Wilson interval.
    Test: the middle layers pooled vs the first and last pooled, conditional odds ratio
    (``scipy.stats.contingency.odds_ratio``) with its exact interval; > 1 wholly: reproduced.
    Needs >= 3 layers.
``point_later``  single-residue ("point") latents are more common in later layers.  Per layer: the
    share of live latents whose pattern is ``point`` (``patterns.py``).  Test: the later half of
    the layers pooled vs the earlier half, odds ratio as above.  Needs >= 2 layers.
``nls_probe``  the most positively weighted latents of a nucleus-vs-rest probe fire on NLS motifs.
    The location probe's nucleus weights (multinomial logistic regression on mean + max pooled
    latents, ``probes.py``; its nucleus row is that class against the rest) give the top
    positive latents (``probe_latents``); the peak residue (``max_pos``) of each of their top
    examples is inside an NLS motif or not.  Per layer: that fraction with a Wilson interval,
    against the corpus base rate (residues inside an NLS motif / all residues).  Reproduced in a
    layer when the interval's lower end exceeds the base rate; the claim when some layer does.
``specific_and_general``  some latents are family-specific, others general across families.  Per
    layer: the shares of live latents that are family-specific and general (judged on enough
    proteins, not specific).  Reproduced when some layer has both.
``secondary_structure``  latents for secondary structure exist.  Per layer and element (helix,
    strand, turn): the test F1 of the latent with the best validation F1 (InterPLM's rule,
    ``concepts.py``), with its bootstrap interval; reproduced when some element has an associated
    latent in some layer.
``dictionary_size``  how dictionary size and k change what is found: the sweep's rows (layer,
    d_sae, k, explained variance, splice cost, dead fraction, associated concepts), from the
    sweep JSON when one is given.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import binomtest
from scipy.stats.contingency import odds_ratio

from ..errors import InputError

CI_LEVEL = 0.95
NUCLEUS = "nucleus"  # the location class of the NLS claim
MIN_LATENTS = 20  # live latents a layer needs for the share tests
MIN_PEAKS = 10  # top-example peaks the NLS test needs in a layer
SS_ELEMENTS = ("helix", "strand", "turn")
SWEEP_FIELDS = ("layer", "d_sae", "k", "explained_variance", "splice_delta_nats", "dead_fraction", "associated_concepts")

REPRODUCED, NOT_REPRODUCED, NOT_ENOUGH, MEASURED, NOT_TESTED = (
    "reproduced", "not reproduced", "not enough evidence", "measured", "not tested")


@dataclass
class Value:
    """One number of a finding: a layer's value in one series, with its interval and counts."""

    series: str
    layer: int
    value: float | None
    lo: float | None = None
    hi: float | None = None
    k: int | None = None  # the count behind a share (or associated latents)
    n: int | None = None  # its denominator
    sae_ids: list[str] = field(default_factory=list)


@dataclass
class Finding:
    claim: str
    statement: str
    test: str
    metric: str  # what the values are
    verdict: str
    reason: str  # the numbers that decided the verdict, in a sentence
    values: list[Value] = field(default_factory=list)
    details: dict = field(default_factory=dict)


@dataclass
class LayerInputs:
    """What the findings read of one layer (all its analysed SAEs pooled)."""

    layer: int
    sae_ids: list[str]
    n_live: int = 0
    n_specific: int = 0
    n_general: int = 0
    n_point: int = 0
    nls_peaks: int = 0  # top-example peaks of the top nucleus latents
    nls_hits: int = 0  # ... inside an NLS motif
    nls_latents: int = 0  # distinct top positive nucleus latents
    # element -> (best val F1 latent's test F1, lo, hi, n associated latents, tested)
    secondary: dict[str, tuple] = field(default_factory=dict)


def wilson(k: int, n: int, level: float = CI_LEVEL) -> tuple[float | None, float | None]:
    if n <= 0:
        return None, None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def share_odds(k_a: int, n_a: int, k_b: int, n_b: int, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """Odds ratio of "a" vs "b" having the property (conditional MLE) and its exact interval."""
    res = odds_ratio([[k_a, n_a - k_a], [k_b, n_b - k_b]])
    ci = res.confidence_interval(confidence_level=level)
    return float(res.statistic), float(ci.low), float(ci.high)


def _share_values(layers: list[LayerInputs], series: str, attr: str) -> list[Value]:
    out = []
    for lay in layers:
        k = getattr(lay, attr)
        lo, hi = wilson(k, lay.n_live)
        out.append(Value(series, lay.layer, k / lay.n_live if lay.n_live else None, lo, hi, k, lay.n_live, lay.sae_ids))
    return out


def _pool(layers: list[LayerInputs], attr: str) -> tuple[int, int]:
    return sum(getattr(x, attr) for x in layers), sum(x.n_live for x in layers)


def _compare(name_a: str, a: list[LayerInputs], name_b: str, b: list[LayerInputs], attr: str) -> tuple[str, str, dict]:
    (ka, na), (kb, nb) = _pool(a, attr), _pool(b, attr)
    if na < MIN_LATENTS or nb < MIN_LATENTS:
        return NOT_ENOUGH, f"fewer than {MIN_LATENTS} live latents in {name_a} ({na}) or {name_b} ({nb})", {}
    or_, lo, hi = share_odds(ka, na, kb, nb)
    detail = {"odds_ratio": or_, "odds_ratio_ci": [lo, hi], name_a: [ka, na], name_b: [kb, nb]}
    text = (f"{name_a} {ka}/{na} = {ka / na:.1%} vs {name_b} {kb}/{nb} = {kb / nb:.1%}; "
            f"odds ratio {or_:.2f} [{lo:.2f}, {hi:.2f}]")
    return (REPRODUCED if lo > 1 else NOT_REPRODUCED), text, detail


def family_middle(layers: list[LayerInputs]) -> Finding:
    f = Finding("family_middle", "Family-specific latents are most common in middle layers.",
                "Share of live latents that are family-specific (held-out F1 >= 0.5 and precision >= 0.7) per layer; "
                "middle layers pooled vs first + last pooled, odds ratio with exact 95 % interval (> 1: reproduced).",
                "share of live latents that are family-specific", NOT_ENOUGH, "",
                _share_values(layers, "family-specific", "n_specific"))
    if len(layers) < 3:
        f.reason = f"needs >= 3 analysed layers; this atlas has {len(layers)}"
        return f
    f.verdict, f.reason, f.details = _compare("middle layers", layers[1:-1], "first + last layers",
                                              [layers[0], layers[-1]], "n_specific")
    return f


def point_later(layers: list[LayerInputs]) -> Finding:
    f = Finding("point_later", "Single-residue (\"point\") latents are more common in later layers.",
                "Share of live latents whose top examples vote 'point' per layer; later half of the layers pooled vs "
                "earlier half pooled, odds ratio with exact 95 % interval (> 1: reproduced).",
                "share of live latents with the point pattern", NOT_ENOUGH, "",
                _share_values(layers, "point", "n_point"))
    if len(layers) < 2:
        f.reason = f"needs >= 2 analysed layers; this atlas has {len(layers)}"
        return f
    half = len(layers) // 2
    f.verdict, f.reason, f.details = _compare("later layers", layers[len(layers) - half:], "earlier layers",
                                              layers[:half], "n_point")
    return f


def nls_probe(layers: list[LayerInputs], base_hits: int, base_residues: int) -> Finding:
    base = base_hits / base_residues if base_residues else None
    f = Finding("nls_probe", "The most positively weighted latents of a nucleus-vs-rest probe fire on NLS motifs.",
                "Top positive latents of the location probe's nucleus class (mean + max pooled SAE latents); the peak "
                "residue of each of their top examples inside an NLS motif or not: that fraction with a Wilson 95 % "
                "interval vs the corpus base rate (residues inside NLS motifs / all residues). Reproduced in a layer "
                "when the interval's lower end exceeds the base rate.",
                "fraction of top-example peak residues inside an NLS motif", NOT_ENOUGH, "",
                details={"base_rate": base, "base_nls_residues": base_hits, "base_residues": base_residues})
    for lay in layers:
        lo, hi = wilson(lay.nls_hits, lay.nls_peaks)
        f.values.append(Value("top nucleus latents", lay.layer, lay.nls_hits / lay.nls_peaks if lay.nls_peaks else None,
                              lo, hi, lay.nls_hits, lay.nls_peaks, lay.sae_ids))
    if not base_hits:
        f.reason = "the corpus has no NLS motif annotations"
        return f
    judged = [(v, lay) for v, lay in zip(f.values, layers) if (v.n or 0) >= MIN_PEAKS]
    if not judged:
        f.reason = (f"no layer has a nucleus probe with >= {MIN_PEAKS} top-example peaks "
                    "(no nucleus class, or probes skipped)")
        return f
    hits = [v for v, _ in judged if v.lo is not None and v.lo > base]
    f.verdict = REPRODUCED if hits else NOT_REPRODUCED
    f.reason = "; ".join(f"layer {v.layer}: {v.k}/{v.n} = {v.value:.1%} [{v.lo:.1%}, {v.hi:.1%}]" for v, _ in judged)
    f.reason += f" vs base rate {base:.2%}"
    return f


def specific_and_general(layers: list[LayerInputs]) -> Finding:
    f = Finding("specific_and_general", "Some latents are family-specific, others general across families.",
                "Per layer, shares of live latents that are family-specific and general (active on >= 5 selection "
                "proteins but not family-specific); reproduced when some layer has both.",
                "share of live latents", NOT_ENOUGH, "",
                _share_values(layers, "family-specific", "n_specific") + _share_values(layers, "general", "n_general"))
    if not layers:
        f.reason = "no analysed layer"
        return f
    both = [x.layer for x in layers if x.n_specific > 0 and x.n_general > 0]
    f.verdict = REPRODUCED if both else NOT_REPRODUCED
    f.reason = "; ".join(f"layer {x.layer}: {x.n_specific} family-specific, {x.n_general} general of {x.n_live} live"
                         for x in layers)
    return f


def secondary_structure(layers: list[LayerInputs]) -> Finding:
    f = Finding("secondary_structure", "Latents for secondary structure exist.",
                "Per layer and element (helix, strand, turn; UniProt features and DSSP / CA rule on structures): the "
                "test F1 of the latent with the best validation F1, with its bootstrap 95 % interval; reproduced when "
                "some element has a latent associated by InterPLM's rule (validation and test F1 > 0.5).",
                "best test F1 per element", NOT_ENOUGH, "")
    tested, found = False, []
    for lay in layers:
        for el in SS_ELEMENTS:
            if el not in lay.secondary:
                continue
            f1, lo, hi, n_assoc, is_tested = lay.secondary[el]
            tested |= bool(is_tested)
            f.values.append(Value(el, lay.layer, f1, lo, hi, n_assoc, None, lay.sae_ids))
            if n_assoc:
                found.append(f"{el} in layer {lay.layer} ({n_assoc} latent(s), best test F1 {f1:.2f})")
    if found:
        f.verdict, f.reason = REPRODUCED, "; ".join(found)
    elif tested:
        best = max((v for v in f.values if v.value is not None), key=lambda v: v.value, default=None)
        f.verdict = NOT_REPRODUCED
        f.reason = "no associated latent" + (f"; best test F1 {best.value:.2f} ({best.series}, layer {best.layer})" if best
                                             else "; no latent reached the reporting floor of validation F1 on any element")
    else:
        f.reason = "no secondary-structure concept had >= 10 regions in each split"
    return f


def read_sweep(path: Path | None) -> list[dict] | None:
    """The sweep rows, or None when no sweep is recorded (no path, or no file there)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        rows = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"sweep file {path}: not JSON ({exc})") from exc
    if isinstance(rows, dict) and "rows" in rows:  # scripts/demo_saes.py's file: rows with their provenance
        rows = rows["rows"]
    if not isinstance(rows, list):
        raise InputError(f"sweep file {path}: expected a list of rows (or {{\"rows\": [...]}}), got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in SWEEP_FIELDS if not isinstance(row, dict) or k not in row]
        if missing:
            raise InputError(f"sweep file {path}: row {i} lacks {', '.join(missing)}")
    return [{k: row[k] for k in SWEEP_FIELDS} for row in rows]


def dictionary_size(sweep: list[dict] | None, source: str) -> Finding:
    f = Finding("dictionary_size", "Dictionary size and k change what is found.",
                "A small sweep of SAE settings per layer: explained variance, splice cost (nats), dead fraction and "
                "associated concepts per (d_sae, k).", "per setting", NOT_TESTED, "no sweep recorded")
    if not sweep:
        return f
    f.verdict = MEASURED
    f.details = {"sweep": sorted(sweep, key=lambda r: (r["layer"], r["d_sae"], r["k"])), "source": source}
    with_c = [r for r in sweep if r["associated_concepts"] is not None]
    best = max(with_c, key=lambda r: r["associated_concepts"], default=None)
    f.reason = f"{len(sweep)} settings recorded" + (
        f"; most associated concepts: {best['associated_concepts']} at layer {best['layer']}, d_sae {best['d_sae']}, "
        f"k {best['k']}" if best else "")
    return f


def evaluate(layers: Sequence[LayerInputs], base_hits: int, base_residues: int, sweep: list[dict] | None,
             sweep_source: str = "") -> list[Finding]:
    """Every finding, in the page's order; ``layers`` sorted by layer."""
    layers = sorted(layers, key=lambda x: x.layer)
    return [family_middle(layers), point_later(layers), nls_probe(layers, base_hits, base_residues),
            specific_and_general(layers), secondary_structure(layers), dictionary_size(sweep, sweep_source)]


def pool_layers(per_sae: list[tuple[int, str, LayerInputs]]) -> list[LayerInputs]:
    """One LayerInputs per layer from the per-SAE ones (counts added; secondary: the best F1)."""
    by_layer: dict[int, list[LayerInputs]] = defaultdict(list)
    for layer, _, x in per_sae:
        by_layer[layer].append(x)
    out = []
    for layer, xs in sorted(by_layer.items()):
        p = LayerInputs(layer=layer, sae_ids=[s for x in xs for s in x.sae_ids])
        for attr in ("n_live", "n_specific", "n_general", "n_point", "nls_peaks", "nls_hits", "nls_latents"):
            setattr(p, attr, sum(getattr(x, attr) for x in xs))
        for x in xs:
            for el, v in x.secondary.items():
                if el not in p.secondary or (v[0] or 0) > (p.secondary[el][0] or 0):
                    p.secondary[el] = v
        out.append(p)
    return out
