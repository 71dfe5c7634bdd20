"""Domain facts every part of plmscope shares, each defined once: the amino-acid alphabet, UniProt
feature names and the concept keys derived from them, the concept proteins and the precision of
their stored residue codes, amino-acid enrichment, the uint8 encoding of
activations and the colour scale of activations.

The build, the reader, the analysis and the pages import these; the front end gets the colour
scale from the pages (``colour_scale()`` as JSON), so a value changed here changes everywhere.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

# ---- amino acids ----

# The 20 standard amino acids; also the order of every aa_counts / aa_background array.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# Unknown / ambiguous / rare letters a sequence may hold (ESM-2 and UniRep both have tokens for them).
NONSTANDARD_AA = "XBZUO"
ACCEPTED_AA = frozenset(AMINO_ACIDS + NONSTANDARD_AA)

# ---- UniProt features ----

# Flat-file FT keys -> the readable type names annotations are stored under.  Helix, strand and
# turn use the terms the computed secondary structure (analysis/secondary.py) uses, so annotated
# and computed secondary structure are the same concepts.
FEATURE_NAMES = {
    "SIGNAL": "signal peptide", "TRANSIT": "transit peptide", "PROPEP": "propeptide", "PEPTIDE": "peptide",
    "CHAIN": "chain", "INIT_MET": "initiator methionine",
    "TRANSMEM": "transmembrane region", "INTRAMEM": "intramembrane region", "TOPO_DOM": "topological domain",
    "DOMAIN": "domain", "REPEAT": "repeat", "ZN_FING": "zinc finger", "DNA_BIND": "DNA-binding region",
    "NP_BIND": "nucleotide binding", "CA_BIND": "calcium binding", "REGION": "region", "COILED": "coiled coil",
    "MOTIF": "short motif", "COMPBIAS": "compositional bias",
    "ACT_SITE": "active site", "BINDING": "binding site", "METAL": "metal binding", "SITE": "site",
    "MOD_RES": "modified residue", "LIPID": "lipidation", "CARBOHYD": "glycosylation",
    "DISULFID": "disulfide bond", "CROSSLNK": "cross-link",
    "HELIX": "helix", "STRAND": "strand", "TURN": "turn",
    "VARIANT": "variant", "CONFLICT": "conflict", "MUTAGEN": "mutagenesis", "VAR_SEQ": "splice variant",
    "NON_TER": "non-terminal residue", "NON_CONS": "non-consecutive residues",
    "NON_STD": "non-standard amino acid", "UNSURE": "unsure",
}
# Other spellings of the same types (UniProt's web and REST labels, shorter forms) -> the name above,
# so a corpus annotated from any of these sources gives the same concepts.
FEATURE_ALIASES = {
    "beta strand": "strand", "transmembrane": "transmembrane region", "intramembrane": "intramembrane region",
    "dna binding": "DNA-binding region", "motif": "short motif", "sequence conflict": "conflict",
    "sequence variant": "variant", "natural variant": "variant", "mutagenesis site": "mutagenesis",
    "alternative sequence": "splice variant", "unsure residue": "unsure", "sequence uncertainty": "unsure",
}
_NAME_OF = {**FEATURE_ALIASES, **{n.lower(): n for n in FEATURE_NAMES.values()}}
# FT keys the corpus reader drops: whole-chain or sequence-bookkeeping features say nothing about
# which residues a latent responds to.
SKIPPED_FEATURES = frozenset({"CHAIN", "CONFLICT", "VARIANT", "VAR_SEQ", "MUTAGEN", "NON_TER", "NON_CONS",
                              "UNSURE", "INIT_MET"})
# Type names that are never concepts: the skipped ones (in case an atlas stores them anyway) and
# peptides, which cover most of a chain.
NON_CONCEPT_FEATURES = frozenset({FEATURE_NAMES[k] for k in SKIPPED_FEATURES} | {"peptide", "non-standard amino acid"})
# Features whose start..end names two bonded residues, not the stretch between them.
POINT_PAIR_FEATURES = frozenset({"DISULFID", "CROSSLNK"})
_POINT_PAIR_NAMES = frozenset(FEATURE_NAMES[k] for k in POINT_PAIR_FEATURES)
SECONDARY_STRUCTURE = frozenset({FEATURE_NAMES["HELIX"], FEATURE_NAMES["STRAND"], FEATURE_NAMES["TURN"]})


def feature_name(type_: str) -> str:
    """The readable name of a feature type given as an FT key, a readable name or an alias;
    unknown types come back lower-cased."""
    t = type_.strip()
    if t.upper() in FEATURE_NAMES:
        return FEATURE_NAMES[t.upper()]
    return _NAME_OF.get(t.lower(), t.lower())


def is_point_pair(type_: str) -> bool:
    return feature_name(type_) in _POINT_PAIR_NAMES


def concept_key(kind: str, type_: str, label: str) -> str | None:
    """Concept name for one annotation row (``pfam:PF00069``, ``feature:signal peptide``,
    ``secondary structure:strand``, ``nls:...``), or None when it is not a concept."""
    if kind == "pfam":
        return f"pfam:{label}"
    t = feature_name(type_).lower()
    if kind == "secondary_structure" or t in SECONDARY_STRUCTURE:
        return f"secondary structure:{t}"
    if kind == "nls":
        return "nls:nuclear localization signal"
    if t in NON_CONCEPT_FEATURES:
        return None
    return f"feature:{t}"


# ---- concept proteins ----

def concept_sample(accessions: Sequence[str], limit: int, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of the ``limit`` accessions with the smallest ``blake2b(seed:accession)``:
    the proteins whose per-residue activations the concept association reads.  A hash order, not a
    random draw from the list, so that the build (which keeps these proteins' residue codes for
    analyze) and analyze pick the same proteins from candidate lists that differ at the margins
    (a structure DSSP cannot read, Pfam hits found during the build)."""
    if len(accessions) <= limit:
        return np.arange(len(accessions))
    keys = [hashlib.blake2b(f"{seed}:{a}".encode(), digest_size=8).digest() for a in accessions]
    return np.sort(np.array(sorted(range(len(keys)), key=keys.__getitem__)[:limit], dtype=np.int64))


# Residue codes (per-residue SAE activations kept for the concept step) are stored as float16 when
# every value of the protein fits (SAE activations are O(1..100); 11 bits of mantissa keep a value
# within 0.05 % of itself), else float32; analyze rounds what it recomputes the same way, so the
# association does not depend on whether the build kept a protein's codes.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def code_values(values: np.ndarray) -> np.ndarray:
    """Residue-code values as stored: float16 when all fit, else float32."""
    values = np.asarray(values, dtype=np.float32)
    if not len(values) or float(np.abs(values).max()) <= FLOAT16_MAX:
        return values.astype(np.float16)
    return values


# ---- amino-acid enrichment ----

# Added to every letter's count on both sides of the ratio.  0.5 (Jeffreys' prior for a
# multinomial; the Haldane-Anscombe correction of a log ratio) keeps the ratio finite for letters
# absent on either side while biasing log folds the least; a latent with few active residues is
# kept out of the descriptions by their minimum residue count, not by a larger pseudo-count.
AA_PSEUDO_COUNT = 0.5


def aa_fold(aa_counts: Sequence[int], background: Sequence[int]) -> np.ndarray:
    """Per letter: its share among a latent's active residues / its share among all residues.

    Ones (no enrichment) when either side has no residues.
    """
    c = np.asarray(aa_counts, np.float64)
    b = np.asarray(background, np.float64)
    if c.sum() <= 0 or b.sum() <= 0:
        return np.ones(len(c))
    p, k = AA_PSEUDO_COUNT, len(c)
    return ((c + p) / (c.sum() + p * k)) / ((b + p) / (b.sum() + p * k))


# ---- activation encoding ----

# Per-residue activations are stored as one byte: code q stands for q / QUANT_LEVELS * scale, where
# scale is the latent's maximum activation over the corpus; the error is at most scale / 510.
QUANT_LEVELS = 255


def quantize(values: np.ndarray, scale) -> np.ndarray:
    """uint8 codes round(v / scale * 255), clipped to 0..255; ``scale`` is a number or one per value.
    A scale <= 0 (a latent never active) gives code 0."""
    s = np.asarray(scale, dtype=np.float64)
    s = np.where(s > 0, s, np.inf)
    v = np.asarray(values).astype(np.float64)
    return np.clip(np.rint(v * (QUANT_LEVELS / s)), 0, QUANT_LEVELS).astype(np.uint8)


def dequantize(codes: np.ndarray, scale: float) -> np.ndarray:
    """float64 activations of uint8 ``codes`` stored with ``scale``."""
    return np.asarray(codes).astype(np.float64) * (float(scale) / QUANT_LEVELS)


# ---- colour scale of activations ----

# viridis, reversed so that weak activations are light and letters drawn on them stay readable;
# colour-blind safe.  Stop i is the colour at activation / scale = i / (len - 1), interpolated
# linearly between stops; exactly 0 is ZERO_COLOUR.
COLOUR_STOPS = ("#fde725", "#b5de2b", "#6ece58", "#35b779", "#1f9e89",
                "#26828e", "#31688e", "#3e4989", "#482878", "#440154")
ZERO_COLOUR = "#eef0f2"
UNMAPPED_COLOUR = "#c8c8c8"  # structure residues without a sequence position
CONTEXT_FREE_COLOUR = "#b9bfc5"  # a pLM's context-free positions: not measured (darker than zero)


def css_gradient() -> str:
    """The scale as a CSS background for legends: zero at the left, the strongest at the right."""
    return f"linear-gradient(to right, {ZERO_COLOUR} 0%, {', '.join(COLOUR_STOPS)})"


def colour_scale() -> dict:
    """The colour scale as the front end reads it (JSON in every page)."""
    return {"stops": list(COLOUR_STOPS), "zero": ZERO_COLOUR, "unmapped": UNMAPPED_COLOUR,
            "context_free": CONTEXT_FREE_COLOUR, "gradient": css_gradient()}
