"""Interpret an atlas: family specificity, activation patterns, concept associations, linear
probes and automatic descriptions, stored in the atlas's analysis tables.

The atlas is copied to a temporary file next to it (``ATLAS.tmp-<pid>``), the analysis is written
there and the copy replaces the atlas (``atomic.writing``: the atlas keeps a plain file's mode, a
server reading the old one keeps reading it): an interrupted run, even a killed one, leaves the
atlas as it was, and the next run removes the killed run's temporary file and starts over.
Re-running replaces the previous analysis of the analysed SAEs.

Each SAE goes through named steps (``analyze_sae``), each with a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from scipy import sparse
from tqdm import tqdm

from .. import atomic, faults, homology
from ..threads import usable_cpus
from ..errors import AtlasError, InputError
from ..store import analysis_reads as reads
from ..store import analysis_writes as writes
from ..store.reader import check_atlas, read_sae_weights, read_saes
from ..store.schema import ANALYSIS_TABLES
from ..store.writer import set_meta
from ..vocab import AMINO_ACIDS, code_values, concept_sample
from . import concepts, describe, family, findings, output_effects, patterns, probes, secondary

log = logging.getLogger(__name__)

TOP_EXAMPLES = 10  # top examples per latent that vote on the pattern


@dataclass(frozen=True)
class AnalyzeSettings:
    """Everything `plmscope analyze` is told; the command line's defaults are these."""

    atlas: Path
    saes: tuple[str, ...] = ()  # SAE ids to analyse; empty: all
    max_proteins: int = 1000  # annotated proteins whose per-residue activations the concepts read; 0 skips
    seed: int = 0  # of every split and probe
    device: str = "auto"  # of the pLM + SAE recomputation
    token_budget: int = 8192  # residues per pLM batch
    sweep: Path | None = None  # SAE settings sweep JSON for the dictionary-size finding; None or missing: not recorded
    output_effect_examples: int = 1  # top examples per latent ablated for its output effect; 0 skips (demo: 3 took 308 s of 379)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AnalyzeSettings:
        return cls(atlas=Path(args.atlas), saes=tuple(args.sae or ()), max_proteins=args.max_proteins,
                   seed=args.seed, device=args.device, token_budget=args.token_budget,
                   sweep=Path(args.sweep) if args.sweep else None,
                   output_effect_examples=args.output_effect_examples)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = AnalyzeSettings
    p.add_argument("--atlas", required=True, help="atlas file (DuckDB) to analyse in place (published atomically)")
    p.add_argument("--sae", action="append", help="SAE id to analyse (repeatable; default: all)")
    p.add_argument("--max-proteins", type=int, default=d.max_proteins,
                   help=f"annotated proteins whose per-residue activations the concept association reads: the "
                        f"codes the build kept (build --concept-proteins), recomputed for the others "
                        f"(default {d.max_proteins}; 0 skips concepts)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of every split and probe (default {d.seed})")
    p.add_argument("--device", default=d.device, help="device for the pLM + SAE recomputation: auto, cpu, cuda")
    p.add_argument("--token-budget", type=int, default=d.token_budget, help=f"residues per pLM batch (default {d.token_budget})")
    p.add_argument("--sweep", help="JSON list of SAE-settings sweep rows (layer, d_sae, k, explained_variance, "
                   "splice_delta_nats, dead_fraction, associated_concepts) for the dictionary-size finding; "
                   "a path with no file there records 'no sweep'")
    p.add_argument("--output-effect-examples", type=int, default=d.output_effect_examples,
                   help=f"top examples per latent on which it is ablated to measure its output effect "
                        f"(default {d.output_effect_examples}; 0 skips)")


def run(args: argparse.Namespace) -> int:
    settings = AnalyzeSettings.from_args(args)
    t0 = time.perf_counter()
    summaries = analyze(settings)
    for s in summaries:
        print(format_summary(s))
    print(f"analyze: {len(summaries)} SAE(s) in {time.perf_counter() - t0:.1f} s -> {settings.atlas}")
    return 0


def analyze(settings: AnalyzeSettings) -> list[dict]:
    """Analyse ``settings.atlas`` in place; returns the summary of each SAE analysed."""
    path = settings.atlas
    if not path.is_file():
        raise AtlasError(f"atlas file {path} does not exist (build one with `plmscope build`)")
    atomic.remove_stale(path)
    with atomic.writing(path) as tmp:
        shutil.copyfile(path, tmp)
        faults.point("analyze:copied")
        summaries = analyze_file(str(tmp), str(path), settings)
        faults.point("analyze:analysed")
    return summaries


def analyze_file(tmp: str, display: str, settings: AnalyzeSettings) -> list[dict]:
    """Analyse the atlas copy ``tmp`` (``display``: the atlas it copies, for messages)."""
    con = writes.open_for_writing(tmp, display)
    try:
        writes.ensure_analysis_tables(con)
        check_atlas(con, display, required=reads.ANALYZE_INPUT_TABLES + ANALYSIS_TABLES)
        sae_rows = read_saes(con)
        unknown = set(settings.saes) - {s["sae_id"] for s in sae_rows}
        if unknown:
            raise InputError(f"{display} has no SAE {', '.join(sorted(unknown))} (it has: {', '.join(s['sae_id'] for s in sae_rows)})")
        wanted = [s for s in sae_rows if not settings.saes or s["sae_id"] in settings.saes]
        corpus = Corpus.load(con)
        corpus.cluster()
        set_meta(con, "homology", corpus.clustering.summary())
        plms = ActivationCache(wanted)
        out = [analyze_sae(con, sae, corpus, plms, settings, Progress(f"SAE {i}/{len(wanted)}"))
               for i, sae in enumerate(wanted, 1)]
        with _bar("atlas · the paper's findings", None, ""):
            found = paper_findings(con, settings)
        for s in out:
            s["findings"] = {f.claim: f.verdict for f in found}
        writes.checkpoint(con)
        return out
    finally:
        con.close()


class Progress:
    """Progress bars on stderr, as the build's (tqdm, shown on a terminal and in logs alike): one per
    step, named "SAE 1/2 · concepts: pLM forward"; steps that walk proteins or latents count them
    (rate and ETA).  Also keeps each step's seconds under its summary key (``times``)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.times: dict[str, float] = defaultdict(float)

    @contextmanager
    def step(self, name: str, timing_key: str, total: int | None = None, unit: str = "prot") -> Iterator[tqdm]:
        t = time.perf_counter()
        bar = _bar(f"{self.prefix} · {name}", total, unit)
        try:
            yield bar
            if total is None:
                bar.update(1)
        finally:
            bar.close()
            self.times[timing_key] += time.perf_counter() - t


def _bar(desc: str, total: int | None, unit: str) -> tqdm:
    # A step without a count shows its name and elapsed time only.
    return tqdm(total=1 if total is None else total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0,
                bar_format="{desc}: {elapsed}" if total is None else None)


class Corpus:
    """Proteins, their annotations as concept regions, and computed secondary structure."""

    def __init__(self, prots, annotation_rows, ss_rows, fam_names, secondary_note: str = ""):
        self.accessions = np.array([p["accession"] for p in prots], dtype=object)
        self.index = {a: i for i, a in enumerate(self.accessions)}
        self.lengths = np.array([p["truncated_to"] or p["length"] for p in prots], dtype=np.int64)
        self.sequences = [p["sequence"] for p in prots]
        self.families = [p["families"] or [] for p in prots]
        self.locations = [p["locations"] or [] for p in prots]
        self.family_names = fam_names
        rows = annotation_rows + ss_rows
        self.regions = concepts.regions_from_annotations(rows, self.index, self.lengths)
        # per concept, regions by source (concepts.concept_source): where each concept comes from
        self.sources: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for row in rows:
            key = concepts.concept_key(row["kind"], row["type"], row["label"])
            if key is not None and row["accession"] in self.index:
                self.sources[key][concepts.concept_source(row["kind"], row["label"])] += 1
        self.secondary_note = secondary_note
        self.clustering: homology.Clustering | None = None

    def cluster(self) -> None:
        """MMseqs2 homology clusters of every protein: the groups of all of analyze's splits."""
        with _bar(f"corpus · homology clusters (MMseqs2, {len(self.accessions)} proteins)", None, "") as bar:
            self.clustering = homology.cluster(list(zip(self.accessions.tolist(), self.sequences)),
                                               homology.ClusterSettings(threads=max(torch.get_num_threads(), 1)))
            bar.update(1)

    @property
    def cluster_key(self) -> np.ndarray:
        """Per protein, the accession of its cluster's representative (object array)."""
        if self.clustering is None:
            raise RuntimeError("Corpus.cluster() has not run")
        return np.array(self.clustering.representative, dtype=object)

    @classmethod
    def load(cls, con) -> Corpus:
        prots = reads.proteins(con)
        rows = reads.annotations(con)
        has_ss = {r["accession"] for r in rows
                  if (concepts.concept_key(r["kind"], r["type"], r["label"]) or "").startswith("secondary structure")}
        # annotated secondary structure wins over the CA rule
        structures = [st for st in reads.structures_for_secondary(con) if st["accession"] not in has_ss]
        ss_rows, note = secondary_structure_rows(structures)
        return cls(prots, rows, ss_rows, reads.family_names(con), secondary_note=note)


def secondary_structure_rows(structures: list[dict]) -> tuple[list[dict], str]:
    """Annotation rows of computed secondary structure (label: the method, DSSP or the CA rule) and
    a note saying which method ran on how many structures (and why DSSP did not, when it did not)."""
    dssp = secondary.dssp_executable()
    if dssp is None and structures:
        log.warning(secondary.MISSING_DSSP)
    rows, methods = [], defaultdict(int)

    def one(st: dict):
        try:
            return secondary.segments(st["content"], st["residue_map"], dssp)
        except (RuntimeError, ValueError) as exc:
            return exc

    # mkdssp runs as a subprocess per structure: one per usable core at a time, results in order
    with _bar(f"corpus · secondary structure ({'DSSP' if dssp else 'CA rule only'})", len(structures), "structure") as bar, \
            ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        for st, res in zip(structures, pool.map(one, structures)):
            bar.update(1)
            if isinstance(res, Exception):
                log.warning("secondary structure of %s skipped: %s", st["structure_id"], res)
                methods["failed"] += 1
                continue
            method, segs = res
            methods[method] += 1
            rows += [{"accession": st["accession"], "kind": "secondary_structure", "type": name,
                      "label": method, "start": s, "end": e} for name, s, e in segs]
    note = ", ".join(f"{k} on {v} structure(s)" for k, v in sorted(methods.items()))
    if dssp is None and structures:
        note += " (mkdssp not installed: full-backbone structures used the CA rule too)"
    return rows, note


@dataclass
class SaeInputs:
    """What the steps of one SAE's analysis read from the atlas."""

    sae: dict  # its saes row
    lat: reads.LatentStats
    live: np.ndarray  # bool per latent: not dead and active somewhere
    pm: sparse.csr_matrix  # proteins x latents: maximum activation (corpus order)
    ps: sparse.csr_matrix  # proteins x latents: sum of activations

    @property
    def sae_id(self) -> str:
        return self.sae["sae_id"]

    @property
    def d(self) -> int:
        return self.sae["d_sae"]


@dataclass
class SaeResults:
    """One SAE's analysis, as the write step stores it."""

    family: family.FamilyResult
    patterns: list[str]  # per latent
    concepts: concepts.ConceptResult | None  # None: concepts skipped
    probes: probes.ProbeSet | None  # None: probes skipped


def analyze_sae(con, sae: dict, corpus: Corpus, plms: "ActivationCache", settings: AnalyzeSettings,
                progress: Progress) -> dict:
    """Analyse one SAE and store the results (replacing a previous analysis); returns its summary."""
    seed = settings.seed
    # Seconds go under the summary's five timing keys: loading counts to family, describing to write.
    with progress.step(f"load {sae['sae_id']}", "family"):
        inputs = load_inputs(con, sae, corpus)
    with progress.step("family specificity", "family"):
        fres = family.family_specificity(inputs.pm, corpus.families, corpus.cluster_key, seed=seed)
    with progress.step("patterns", "patterns", total=inputs.d, unit="latent") as bar:
        pattern = activation_patterns(con, inputs, bar)
    cres, concept_summary = concept_associations(con, inputs, corpus, plms, settings, progress)
    with progress.step("concept sources", "concepts"):
        sources = concept_inventory(corpus, settings, cres, inputs.live)
    with progress.step("probes", "probes", total=2 * len(probes.POOLINGS), unit="fit") as bar:
        probe_summary, fits = fit_probes(con, inputs, corpus, seed, bar)
    effects, effect_summary = output_effects.compute(con, inputs, plms.plms, settings, progress)
    res = SaeResults(family=fres, patterns=pattern, concepts=cres, probes=fits)
    with progress.step("descriptions", "write", total=inputs.d, unit="latent") as bar:
        columns = latent_analysis_columns(con, inputs, corpus, res, bar)
    with progress.step("write", "write"):
        write_results(con, inputs, res, columns)
        writes.write_concept_sources(con, inputs.sae_id, sources)
        output_effects.write(con, inputs.sae_id, effects)
    summary = {"sae_id": inputs.sae_id, "plm": sae["plm"], "layer": sae["layer"], "d_sae": inputs.d, "seed": seed,
               "homology": corpus.clustering.summary(),
               "family": family.summarize(fres, inputs.live), "patterns": pattern_counts(pattern),
               "concepts": {**concept_summary, "secondary_structure": corpus.secondary_note},
               "probes": probe_summary, "output_effects": effect_summary,
               "timing_s": {k: round(v, 2) for k, v in progress.times.items()}}
    writes.write_summary(con, inputs.sae_id, summary)
    return summary


def load_inputs(con, sae: dict, corpus: Corpus) -> SaeInputs:
    lat = reads.latent_stats(con, sae["sae_id"], sae["d_sae"])
    stats = reads.protein_latent_stats(con, sae["sae_id"])
    shape = (len(corpus.accessions), sae["d_sae"])
    rows = np.searchsorted(corpus.accessions, stats["accession"])  # accessions are sorted
    cols = stats["latent"].astype(np.int64)
    pm = sparse.csr_matrix((stats["max_act"].astype(np.float32), (rows, cols)), shape=shape)
    ps = sparse.csr_matrix((stats["sum_act"].astype(np.float32), (rows, cols)), shape=shape)
    return SaeInputs(sae=sae, lat=lat, live=~lat.is_dead & (lat.max_act > 0), pm=pm, ps=ps)


def activation_patterns(con, inputs: SaeInputs, bar: tqdm) -> list[str]:
    """Each latent's pattern, voted by its top examples."""
    examples: dict[int, list[np.ndarray]] = defaultdict(list)
    for latent, blob in reads.top_examples(con, inputs.sae_id, TOP_EXAMPLES):
        examples[latent].append(np.frombuffer(blob, dtype=np.uint8).astype(np.float32))
    out = []
    for j in range(inputs.d):
        out.append(patterns.classify_latent(examples.get(j, []), is_dead=not inputs.live[j])[0])
        bar.update(1)
    return out


def pattern_counts(pattern: list[str]) -> dict[str, int]:
    counts = {p: 0 for p in patterns.PATTERNS}
    for p in pattern:
        counts[p] += 1
    return counts


class ActivationCache:
    """Per-residue SAE activations of the concept proteins, for every SAE analysed: the codes the
    build kept (``residue_codes``, ``plmscope build --concept-proteins``), and for the proteins it did
    not keep, one pLM forward per pLM that serves every SAE of that pLM (the first SAE that needs
    them computes them for all).  Recomputed values are rounded as the build stores them
    (``vocab.code_values``), so the association does not depend on which proteins the build kept."""

    def __init__(self, saes: list[dict]):
        self.saes = saes
        self.acts: dict[str, sparse.csr_matrix] = {}
        self.origin: dict[str, dict[str, int]] = {}  # per SAE: proteins read from the build / recomputed
        self.plms: dict[str, object] = {}  # loaded pLMs by name, shared with the other steps

    def get(self, con, sae_id: str, corpus: Corpus, chosen: np.ndarray, settings: AnalyzeSettings,
            progress: Progress) -> tuple[sparse.csr_matrix, int, dict[str, int]]:
        """(residues x latents activations of ``chosen`` proteins, context-free positions left out;
        the number left out per protein; proteins read from the build and recomputed)."""
        sae = next(s for s in self.saes if s["sae_id"] == sae_id)
        if sae_id not in self.acts:
            group = [s for s in self.saes if s["plm"] == sae["plm"]]
            ids = [str(corpus.accessions[i]) for i in chosen]
            with progress.step("concepts: read the build's residue codes", "concepts"):
                stored = [reads.residue_codes(con, s["sae_id"], s["d_sae"], ids) for s in group]
            missing = [i for i, a in zip(chosen, ids) if any(a not in st for st in stored)]
            computed = [{} for _ in group]
            if missing:
                computed = self._compute(con, group, corpus, missing, settings, progress)
            for s, st, comp in zip(group, stored, computed):
                self.acts[s["sae_id"]] = sparse.vstack([st.get(a, comp.get(a)) for a in ids], format="csr")
                n_read = sum(a in st for a in ids)
                self.origin[s["sae_id"]] = {"from_build": n_read, "recomputed": len(ids) - n_read}
        return self.acts.pop(sae_id), int(sae["context_free"]), self.origin[sae_id]

    def _compute(self, con, group: list[dict], corpus: Corpus, rows: list[int], settings: AnalyzeSettings,
                 progress: Progress) -> list[dict[str, sparse.csr_matrix]]:
        plm_name = group[0]["plm"]
        plm = self.plms.get(plm_name)
        if plm is None:
            with progress.step("concepts: load pLM", "concepts"):
                from ..plm import load_plm

                plm = self.plms[plm_name] = load_plm(plm_name, device=settings.device)
        ids = [str(corpus.accessions[i]) for i in rows]
        seqs = [corpus.sequences[i][: corpus.lengths[i]] for i in rows]
        weights = [read_sae_weights(con, s["sae_id"], settings.atlas) for s in group]
        layers = sorted({int(s["layer"]) for s in group})
        what = (f"concepts: pLM forward of the {len(ids)} proteins the build kept no codes of "
                f"(layers {', '.join(map(str, layers))}, {len(group)} SAEs)")
        with progress.step(what, "concepts", total=len(ids)) as bar:
            return _residue_activations(weights, plm, seqs, ids, settings.token_budget, bar)


def concept_associations(con, inputs: SaeInputs, corpus: Corpus, plms: ActivationCache, settings: AnalyzeSettings,
                         progress: Progress) -> tuple[concepts.ConceptResult | None, dict]:
    """InterPLM's association rule (``concepts`` module docstring) on the per-residue activations of
    up to ``max_proteins`` annotated proteins (the build's residue codes, recomputed where it kept
    none).  The pLM's context-free positions are left out of them, as from every other statistic:
    the proteins are scored from residue cf + 1 on."""
    chosen = _pick_concept_proteins(corpus, settings.max_proteins, settings.seed) if settings.max_proteins > 0 else np.array([], int)
    if len(chosen) == 0:
        with progress.step("concepts: skipped", "concepts"):
            return None, {"skipped": "no annotated proteins (or --max-proteins 0)"}
    ids = [str(corpus.accessions[i]) for i in chosen]
    acts, cf, origin = plms.get(con, inputs.sae_id, corpus, chosen, settings, progress)
    with progress.step("concepts: associate", "concepts"):
        sub = {int(p): k for k, p in enumerate(chosen)}
        lengths = np.maximum(corpus.lengths[chosen] - cf, 0)
        regions = [(sub[i], c, max(s - cf, 1), e - cf) for i, c, s, e in corpus.regions if i in sub and e - cf >= 1]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        groups = corpus.cluster_key[chosen]
        validation = concepts.split_validation(groups, ids, seed=settings.seed)
        # The scale comes from the atlas's per-protein maxima of every protein outside the test
        # split's clusters: more proteins than the concept subset, and no test protein or homologue.
        test_groups = np.unique(groups[~validation].astype(str))
        scale = concepts.normalising_max(inputs.pm, corpus.cluster_key, test_groups)
        n_norm = int((~np.isin(corpus.cluster_key.astype(str), test_groups)).sum())
        cres, n_ss = _associate_by_universe(acts, offsets, lengths, regions, validation, scale, groups, settings.seed)
    return cres, {
        **concepts.summarize(cres, inputs.live),
        "n_proteins": len(chosen), "n_validation": int(validation.sum()), "n_test": int((~validation).sum()),
        "n_clusters": int(len(np.unique(groups.astype(str)))),
        "split": "MMseqs2 clusters (>= 30 % identity over >= 80 % of both sequences) hashed whole to validation/test",
        "normalisation": f"each latent's maximum over the {n_norm} atlas proteins outside the test split's clusters",
        "n_normalisation_proteins": n_norm,
        "context_free_positions_left_out": cf,
        "codes_from_build": origin["from_build"], "codes_recomputed": origin["recomputed"],
        "secondary_structure_universe": (f"secondary-structure concepts scored on the {n_ss} concept proteins with any "
                                         f"secondary-structure annotation (a protein without a structure is not "
                                         f"evidence against a helix); every other concept on all of them"),
    }


SS_PREFIX = "secondary structure:"


def _associate_by_universe(acts, offsets, lengths, regions, validation, scale, groups, seed):
    """InterPLM's rule with each concept scored on the proteins whose annotation of it is complete:
    secondary structure (from structures, or UniProt features made from them) only on proteins that
    have any; every other concept on all proteins.  Returns (result, proteins in the first set)."""
    main = [r for r in regions if not r[1].startswith(SS_PREFIX)]
    ss = [r for r in regions if r[1].startswith(SS_PREFIX)]
    res = concepts.associate(acts, offsets, lengths, main, validation, scale=scale, groups=groups, seed=seed)
    prots = np.array(sorted({r[0] for r in ss}), dtype=np.int64)
    if not len(prots) or validation[prots].all() or not validation[prots].any():
        return res, int(len(prots))
    rows = np.concatenate([np.arange(offsets[p], offsets[p] + lengths[p]) for p in prots])
    sub_len = np.asarray(lengths)[prots]
    sub_off = np.concatenate([[0], np.cumsum(sub_len)[:-1]])
    local = {int(p): i for i, p in enumerate(prots)}
    ss_res = concepts.associate(acts[rows], sub_off, sub_len, [(local[r[0]], *r[1:]) for r in ss], validation[prots],
                                scale=scale, groups=np.asarray(groups, dtype=object)[prots], seed=seed)
    return concepts.combine(res, ss_res), int(len(prots))


def _residue_activations(saes: list[tuple[dict, bytes]], plm, seqs, ids, token_budget, bar: tqdm) -> list[dict[str, sparse.csr_matrix]]:
    """Per SAE ((cfg, weights)), each protein's residues x latents SAE activations without its
    context-free positions, values rounded as the build stores them (``vocab.code_values``).
    One forward serves every SAE's layer."""
    from ..sae.io import sae_from_bytes

    models = [sae_from_bytes(cfg, w).to(plm.device) for cfg, w in saes]
    layers = [int(cfg["plmscope"]["layer"]) for cfg, _ in saes]
    cf = plm.context_free_positions
    blocks: list[dict[str, sparse.csr_matrix]] = [{} for _ in models]
    with torch.no_grad():
        for rid, _, reps in plm.iter_layer_representations(zip(ids, seqs), layers, token_budget=token_budget):
            for j, (sae, rep) in enumerate(zip(models, reps)):
                z = sparse.csr_matrix(sae.encode(rep[cf:].to(plm.device)).float().cpu().numpy())
                z.data = code_values(z.data).astype(np.float32)
                blocks[j][rid] = z
            bar.update(1)
    return blocks


def concept_inventory(corpus: Corpus, settings: AnalyzeSettings, cres: concepts.ConceptResult | None,
                      live: np.ndarray) -> list[dict]:
    """Every concept's sources and counts, with the split the association used (the same proteins and
    split as ``concept_associations``: both are seeded functions of the corpus)."""
    validation_of: dict[int, bool] = {}
    if cres is not None and settings.max_proteins > 0:
        chosen = _pick_concept_proteins(corpus, settings.max_proteins, settings.seed)
        if len(chosen):
            ids = [str(corpus.accessions[i]) for i in chosen]
            validation = concepts.split_validation(corpus.cluster_key[chosen], ids, seed=settings.seed)
            validation_of = {int(i): bool(v) for i, v in zip(chosen, validation)}
    return concepts.inventory(corpus.regions, corpus.sources, validation_of, cres, live)


def paper_findings(con, settings: AnalyzeSettings) -> list[findings.Finding]:
    """The paper's claims tested over every analysed SAE of the pLM with the most analysed layers
    (``findings`` module docstring), stored in the findings tables (replacing previous ones)."""
    saes = reads.analysed_saes(con)
    by_plm: dict[str, set] = defaultdict(set)
    for s in saes:
        by_plm[s["plm"]].add(s["layer"])
    plm = max(sorted(by_plm), key=lambda p: len(by_plm[p]), default=None)
    per_sae = []
    for s in (x for x in saes if x["plm"] == plm):
        fam = s["summary"].get("family", {})
        lay = findings.LayerInputs(layer=s["layer"], sae_ids=[s["sae_id"]], n_live=int(fam.get("n_live", 0)),
                                   n_specific=int(fam.get("n_family_specific", 0)), n_general=int(fam.get("n_general", 0)),
                                   n_point=reads.pattern_count(con, s["sae_id"], "point"))
        peaks = reads.probe_class_peaks(con, s["sae_id"], findings.NUCLEUS, "sae_mean_max", "nls", TOP_EXAMPLES)
        lay.nls_latents, lay.nls_peaks, lay.nls_hits = int(peaks["n_latents"]), int(peaks["n_peaks"]), int(peaks["n_hits"])
        for r in reads.concept_best(con, s["sae_id"], "secondary structure:"):
            lay.secondary[r["concept"].split(":", 1)[1]] = (r["test_f1"], r["lo"], r["hi"], int(r["n_associated"]),
                                                           bool(r["tested"]))
        per_sae.append((s["layer"], s["sae_id"], lay))
    base_hits, base_residues = reads.annotation_base_rate(con, "nls")
    sweep = findings.read_sweep(settings.sweep)
    out = findings.evaluate(findings.pool_layers(per_sae), base_hits, base_residues, sweep,
                            sweep_source=str(settings.sweep) if sweep else "")
    for f in out:
        f.details.setdefault("plm", plm)
    writes.replace_findings(con, out)
    return out


def _pick_concept_proteins(corpus: Corpus, limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` proteins with a concept region, in ``vocab.concept_sample``'s hash order
    (the build keeps the residue codes of the same ones, seed 0)."""
    annotated = np.unique([r[0] for r in corpus.regions])
    return annotated[concept_sample([str(corpus.accessions[i]) for i in annotated], limit, seed)]


SUMMARY_TOP_LATENTS = 3  # per class, in the summary JSON (the page lists TOP_LATENTS with the atlas's evidence)


def fit_probes(con, inputs: SaeInputs, corpus: Corpus, seed: int, bar: tqdm) -> tuple[dict, probes.ProbeSet | None]:
    """Location probes on SAE latents and on the raw pLM representation, each pooled mean and
    mean + max, on one cluster-grouped split: (summary, the probe set or None when skipped)."""
    try:
        rows, y = probes.single_label(corpus.locations)
    except probes.ProbeSkipped as exc:
        log.warning("probes skipped: %s", exc)
        return {"skipped": str(exc)}, None
    emb_acc, emb_mean, emb_max = reads.embeddings(con, inputs.sae_id)
    raw, raw_skipped = None, "the atlas has no protein_embeddings for this SAE"
    if emb_mean is not None:
        # only proteins with both feature sets, so every fit sees the same rows
        pos = {a: i for i, a in enumerate(emb_acc)}
        keep = np.array([corpus.accessions[i] in pos for i in rows])
        rows, y = rows[keep], y[keep]
        at = [pos[corpus.accessions[i]] for i in rows]
        raw = (emb_mean[at], emb_max[at])
    bar.set_postfix(proteins=len(rows), refresh=False)
    try:
        pset = probes.run_probes((inputs.pm[rows], inputs.ps[rows], corpus.lengths[rows]), raw, y,
                                 corpus.cluster_key[rows].tolist(), task="location", seed=seed,
                                 raw_skipped=raw_skipped, on_fit=lambda _: bar.update(1))
    except probes.ProbeSkipped as exc:
        return {"skipped": str(exc)}, None
    for fit in pset.fits:
        if fit.source == "sae":
            fit.top = probes.top_latents(fit, inputs.d, active=inputs.pm[rows], y=y)
    return _probe_summary(pset, y, inputs), pset


def _probe_scores(fit: probes.ProbeResult) -> dict:
    out = {"accuracy": fit.accuracy, "accuracy_ci": list(fit.accuracy_ci), "macro_f1": fit.macro_f1,
           "n_features": fit.n_features}
    if fit.source == "majority":
        out["class"] = fit.majority_class
    else:
        out["C"] = fit.C
        out["cv_accuracy"] = fit.cv_accuracy[fit.C]
    return out


def _probe_summary(pset: probes.ProbeSet, y: np.ndarray, inputs: SaeInputs) -> dict:
    base = pset.baseline
    density = inputs.lat.n_active_proteins / max(int(inputs.sae.get("n_proteins") or 0), 1)
    fits: dict[str, dict] = {f.features: _probe_scores(f) for f in pset.fits}
    if pset.raw_skipped:
        fits.update({f"raw_{p}": {"skipped": pset.raw_skipped} for p in probes.POOLINGS})
    top = {}
    for f in pset.fits:
        if f.source != "sae":
            continue
        top[f.features] = {cls: [{"latent": r["latent"], "pooling": r["pooling"], "weight": r["weight"],
                                  "frac_class": r["frac_class"], "frac_rest": r["frac_rest"],
                                  "density": float(density[r["latent"]])}
                                 for r in f.top if r["class"] == cls and r["sign"] == "positive"][:SUMMARY_TOP_LATENTS]
                           for cls in f.classes}
    return {
        "task": "location", "labels": "single-location proteins, multiclass", "n_classes": len(set(y)),
        "classes": sorted({str(c) for c in y}), "n_proteins": len(y), "n_train": base.n_train, "n_test": base.n_test,
        "n_test_clusters": pset.n_test_clusters,
        "split": (f"StratifiedGroupKFold over MMseqs2 clusters, 1 of {probes.TEST_FOLDS} folds held out as test; "
                  "the same rows for every fit"),
        "regularisation": (f"C from {list(probes.C_GRID)} by {len(pset.folds)}-fold StratifiedGroupKFold CV (clusters) "
                           "on the training rows only, per feature set; standardisation fitted inside each fold"),
        "interval": (f"{probes.CI_LEVEL:.0%} percentile bootstrap over test clusters ({probes.N_BOOT} resamples, "
                     "paired for differences)"),
        "majority": _probe_scores(base),
        "fits": fits,
        "comparisons": ({c.pooling: {"sae": f"sae_{c.pooling}", "raw": f"raw_{c.pooling}", "diff": c.diff,
                                     "diff_ci": list(c.diff_ci), "n_sae_only": c.n_sae_only,
                                     "n_raw_only": c.n_raw_only, "mcnemar_p": c.mcnemar_p}
                         for c in pset.comparisons} or {"skipped": pset.raw_skipped}),
        "top_latents": top,
    }


def latent_analysis_columns(con, inputs: SaeInputs, corpus: Corpus, res: SaeResults, bar: tqdm) -> dict[str, np.ndarray]:
    """The latent_analysis rows: each latent's pattern, family, named concept and description.

    The named concept is ``describe.choose_concept`` of the latent's reported pairs: chosen by
    validation F1, never by test F1; ``concept_f1`` is its test F1, ``concept_val_f1`` its validation F1.
    """
    d, fres, cres = inputs.d, res.family, res.concepts
    candidates = _concept_candidates(cres, d)
    bg = reads.aa_background(con, inputs.sae_id)
    chosen: list[describe.ConceptEvidence | None] = []
    descriptions = []
    for i in range(d):
        c = describe.choose_concept(candidates[i]) if inputs.live[i] else None
        chosen.append(c)
        fam = describe.FamilyEvidence(
            family=fres.family[i], name=corpus.family_names.get(fres.family[i] or "", ""),
            precision=float(fres.precision[i]), f1=float(fres.f1[i]), specific=bool(fres.specific[i]),
            n_active_selection=int(fres.n_active_selection[i]), n_heldout_members=int(fres.n_heldout_members[i]),
            n_heldout_active=int(fres.n_heldout_active[i]))
        descriptions.append(describe.describe(
            pattern=res.patterns[i], concept=c, family=fam,
            enriched=describe.aa_enrichment(inputs.lat.aa_counts[i], bg, AMINO_ACIDS),
        ) if inputs.live[i] else describe.describe(pattern="dead"))
        bar.update(1)
    named = [c if c is not None and c.associated else None for c in chosen]  # the columns hold associations only
    return {
        "latent": np.arange(d, dtype=np.int32), "pattern": np.array(res.patterns, dtype=object),
        "family": np.array(fres.family, dtype=object), "family_threshold": fres.fraction.astype(np.float32),
        "family_precision": fres.precision, "family_recall": fres.recall, "family_f1": fres.f1, "family_auc": fres.auc,
        "family_specific": fres.specific,
        "concept": np.array([c.concept if c else None for c in named], dtype=object),
        "concept_val_f1": np.array([c.val_f1 if c else np.nan for c in named], dtype=np.float64),
        "concept_f1": np.array([c.test_f1 if c else np.nan for c in named], dtype=np.float64),
        "description": np.array(descriptions, dtype=object),
    }


def _concept_candidates(cres: concepts.ConceptResult | None, d: int) -> list[list[describe.ConceptEvidence]]:
    """Per latent, its reported (latent, concept) pairs as the descriptions weigh them."""
    out: list[list[describe.ConceptEvidence]] = [[] for _ in range(d)]
    if cres is None or not len(cres.concepts):
        return out
    for li, ci in zip(*np.nonzero(cres.reported)):
        out[li].append(describe.ConceptEvidence(
            concept=cres.concepts[ci], val_f1=float(cres.val_f1[li, ci]), test_f1=float(cres.test_f1[li, ci]),
            test_f1_lo=float(cres.test_f1_lo[li, ci]), test_f1_hi=float(cres.test_f1_hi[li, ci]),
            n_val=int(cres.n_val[ci]), n_test=int(cres.n_test[ci]), residue_level=bool(cres.residue_level[ci]),
            associated=bool(cres.associated[li, ci])))
    return out


def write_results(con, inputs: SaeInputs, res: SaeResults, columns: dict[str, np.ndarray]) -> None:
    """Replace the SAE's previous analysis with this one (all but the summary, which carries the timings)."""
    sid = inputs.sae_id
    writes.clear_analysis(con, sid)
    writes.write_latent_analysis(con, sid, columns)
    if res.concepts is not None and len(res.concepts.concepts):
        writes.write_latent_concepts(con, sid, _concept_rows(res.concepts, inputs.live))
    if res.probes is not None:
        for fit in res.probes.fits + [res.probes.baseline]:
            writes.write_probe_result(con, sid, {
                "task": fit.task, "features": fit.features, "source": fit.source, "pooling": fit.pooling,
                "accuracy": fit.accuracy, "accuracy_lo": fit.accuracy_ci[0], "accuracy_hi": fit.accuracy_ci[1],
                "macro_f1": fit.macro_f1, "n_train": fit.n_train, "n_test": fit.n_test, "n_features": fit.n_features,
                "c": fit.C, "cv_accuracy": fit.cv_accuracy.get(fit.C) if fit.C is not None else None,
                "classes": fit.classes})
            if fit.source == "sae":
                writes.write_probe_latents(con, sid, fit.task, fit.features, fit.top)
        for c in res.probes.comparisons:
            writes.write_probe_comparison(con, sid, {
                "task": c.task, "pooling": c.pooling, "sae_accuracy": c.sae_accuracy, "raw_accuracy": c.raw_accuracy,
                "diff": c.diff, "diff_lo": c.diff_ci[0], "diff_hi": c.diff_ci[1], "n_sae_only": c.n_sae_only,
                "n_raw_only": c.n_raw_only, "mcnemar_p": c.mcnemar_p})


def _concept_rows(cres: concepts.ConceptResult, live) -> dict[str, np.ndarray]:
    # The reported pairs (each latent's best by *validation* F1, never by test F1, plus every
    # associated pair) of live latents, each with the numbers of both splits.
    li, ci = np.nonzero(cres.reported & np.asarray(live, bool)[:, None])
    return {
        "latent": li.astype(np.int32), "concept": np.array(cres.concepts, dtype=object)[ci],
        "level": np.where(cres.residue_level[ci], "residue", "region").astype(object),
        "threshold": cres.threshold[li, ci].astype(np.float32), "norm_max": cres.scale[li].astype(np.float32),
        "val_precision": cres.val_precision[li, ci].astype(np.float64),
        "val_recall": cres.val_recall[li, ci].astype(np.float64), "val_f1": cres.val_f1[li, ci].astype(np.float64),
        "test_precision": cres.test_precision[li, ci].astype(np.float64),
        "test_recall": cres.test_recall[li, ci].astype(np.float64), "test_f1": cres.test_f1[li, ci].astype(np.float64),
        "test_f1_lo": cres.test_f1_lo[li, ci].astype(np.float64), "test_f1_hi": cres.test_f1_hi[li, ci].astype(np.float64),
        "n_val": cres.n_val[ci].astype(np.int32), "n_test": cres.n_test[ci].astype(np.int32),
        "associated": cres.associated[li, ci],
    }


def format_summary(s: dict) -> str:
    f, p, c, pr = s["family"], s["patterns"], s.get("concepts", {}), s.get("probes", {})
    lines = [f"{s['sae_id']} (layer {s['layer']}, {s['d_sae']} latents, {f['n_live']} live)"]
    lines.append(f"  family: {f['n_family_specific']} family-specific, {f['n_general']} general, {f['n_rare']} rare, "
                 f"{f['n_no_heldout_evidence']} without held-out evidence ({f['n_families_with_specific_latent']} families)")
    lines.append("  patterns: " + ", ".join(f"{k} {v}" for k, v in p.items()))
    if "skipped" in c:
        lines.append(f"  concepts: skipped ({c['skipped']})")
    else:
        lines.append(f"  concepts (InterPLM's rule): {c['n_associated_pairs']} associated pairs, {c['n_associated_latents']} "
                     f"latents, {c['n_associated_concepts']} concepts; {c['n_pairs_passing_validation']} pairs passed "
                     f"validation; {c['n_concepts_tested']} of {c['n_concepts_scored']} concepts with >= {c['min_per_split']} "
                     f"regions per split ({c['n_proteins']} proteins: {c['n_validation']} validation, {c['n_test']} test; "
                     f"codes of {c['codes_from_build']} from the build, {c['codes_recomputed']} recomputed)")
    lines += format_probe_lines(pr)
    if s.get("findings"):
        lines.append("  paper's findings: " + ", ".join(f"{k} {v}" for k, v in s["findings"].items()))
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timing_s"].items()))
    return "\n".join(lines)


def _ci(v) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]"


def format_probe_lines(pr: dict) -> list[str]:
    """The probe lines of ``format_summary``: the baseline, each pooling's SAE and raw fit, the test."""
    if "skipped" in pr:
        return [f"  probes: skipped ({pr['skipped']})"]
    m = pr["majority"]
    lines = [f"  probes ({pr['task']}, {pr['n_classes']} classes, {pr['n_train']} train / {pr['n_test']} test proteins "
             f"in {pr['n_test_clusters']} test clusters; 95 % CI over test clusters): "
             f"majority class {m['accuracy']:.3f} {_ci(m['accuracy_ci'])}"]
    fits, comps = pr["fits"], pr["comparisons"]
    for pooling in probes.POOLINGS:
        sae_f, raw_f = fits.get(f"sae_{pooling}", {}), fits.get(f"raw_{pooling}", {})

        def one(f):
            if "skipped" in f:
                return f"skipped ({f['skipped']})"
            return f"{f['accuracy']:.3f} {_ci(f['accuracy_ci'])} (C {f['C']:g})"

        line = f"    {probes.POOLING_LABELS[pooling]:<10} SAE {one(sae_f)} vs raw {one(raw_f)}"
        c = comps.get(pooling)
        if c:
            line += (f"; SAE - raw {c['diff']:+.3f} {_ci(c['diff_ci'])}, McNemar p {c['mcnemar_p']:.3f} "
                     f"({c['n_sae_only']} vs {c['n_raw_only']} discordant)")
        lines.append(line)
    return lines
