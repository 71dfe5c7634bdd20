"""Per-SAE aggregates of an atlas build: one streaming pass, bounded memory, exactly mergeable.

``SAEAggregate.update`` takes a batch of proteins with their SAE codes in sparse form (rows,
latents, values of the non-zero entries, e.g. from ``sparse_codes``) and folds them into:

* per latent: counts of active residues / proteins, max, the sum of activations (fixed point,
  2**-16 resolution: integer addition is associative, so shards merge *exactly*), a histogram of the
  non-zero per-residue activations over the fixed log-spaced edges ``HIST_EDGES`` (values outside
  [1e-4, 1e3] are counted in the first/last bin, so the totals equal the active residue counts),
  amino-acid counts of active residues;
* top-N examples per latent: the N proteins with the highest max activation, ties broken by
  accession (smaller first), with their sparse per-residue vectors;
* a stratified sketch for the quantile bins: the global max is unknown until the end, so for each
  latent and each fixed log-spaced bucket of the protein max (the HIST edges) we keep the ``per_bin``
  proteins with the lowest priority ``splitmix64(blake2b64(accession) ^ latent * phi)``.  Buckets
  that lie wholly below the latent's running max / ``n_bins`` can only end in quantile bin 0 (the
  max never decreases), so they are collapsed into one reservoir (the latent's ``sketch_floor``
  bucket): the lowest priorities of a union are the lowest of its parts' lowest, so the samples
  do not change, and a latent keeps about log10(n_bins) decades of buckets (~7 with the defaults)
  however many proteins stream past, instead of every decade its tail ever reached.  At
  finalisation each quantile bin ``[i*M/n, (i+1)*M/n)`` (M = latent max; the last bin includes M)
  takes, among the candidates whose max lies in it, the ``per_bin`` lowest priorities.  It is a
  deterministic hash sample: every sampled protein's max lies in its bin, and ``n_proteins`` per bin
  is an exact count (from the per-protein statistics); a bin can hold fewer than ``per_bin``
  samples when a bucket straddling its edge kept only proteins from the other side.
* none of it sees the pLM's context-free positions (``AggregateSettings.context_free``): their codes
  are dropped on the way in and ``n_residues`` / the background do not count them;
* per protein (streamed to spill files, not kept in memory): every active (protein, latent) pair
  (max, sum, n_active), the top ``protein_top`` latents with vectors, and the mean raw pLM
  representation and its per-dimension maximum over the residues; for the concept proteins the
  build names (``keep_codes``), every residue's codes;
* per spill part (not kept either): sparse (label, latent) counts of active residues inside Pfam
  families / annotation types, summed over the parts when the atlas is written.

Memory bound (independent of corpus size): slot ids ``8 * L * (N + 56 * per_bin)`` bytes plus, per
filled slot, ~40 bytes of metadata and 8 bytes per active residue of its vector; with the sketch
collapse at most ``N + 8 * per_bin`` slots per latent fill (the buckets from max / n_bins up to the
max, plus the floor), i.e. about ``L * (N + 8 * per_bin) * (48 + 8 * mean active residues)`` bytes,
plus ``L * (56 + 20 + 4) * 8`` bytes of counters; per-protein outputs and (label, latent) counts
between two ``flush`` calls.

``merge(other)`` adds counters, unions spill lists and re-offers the other's reservoir entries;
the selection orders are total, so build-on-shards-then-merge equals one pass exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import faults
from ..store.schema import HIST_BINS, HIST_MAX_EXP, HIST_MIN_EXP
from ..vocab import AMINO_ACIDS
from ._state import EMPTY, Columns, LabelCounter, Reservoir, SlotPool, _segment_index, state_copy

HIST_EDGES = np.logspace(HIST_MIN_EXP, HIST_MAX_EXP, HIST_BINS + 1)
FIXED_POINT = 2.0**16  # resolution of the exact, mergeable activation sums
_PHI = np.uint64(0x9E3779B97F4A7C15)
_AA_CODE = np.full(256, 255, dtype=np.uint8)
for _i, _a in enumerate(AMINO_ACIDS):
    _AA_CODE[ord(_a)] = _i


@dataclass
class AggregateSettings:
    top_n: int = 24
    n_bins: int = 5
    per_bin: int = 8
    protein_top: int = 16
    label_top: int = 20  # families / annotation types stored per latent
    # The pLM's context-free positions (``ProteinLM.context_free_positions``): residues 1..this are
    # left out of every statistic, as if they were not in the protein.
    context_free: int = 0


def hist_bucket(values: np.ndarray) -> np.ndarray:
    """Index of the log-spaced HIST bin of each (positive) value, clamped to [0, HIST_BINS)."""
    return np.clip(np.searchsorted(HIST_EDGES, values, side="right") - 1, 0, HIST_BINS - 1)


def sketch_floor(max_act: np.ndarray, n_bins: int) -> np.ndarray:
    """Per latent: the highest bucket lying wholly below ``max_act / n_bins`` (0 if none).

    Bucket b spans [EDGE_b, EDGE_b+1) (the last one is open above); it is wholly below t when
    EDGE_b+1 <= t.  The 1e-9 margin keeps float rounding in ``bin_index`` from putting a value
    of such a bucket into bin 1."""
    t = max_act.astype(np.float64) / n_bins * (1 - 1e-9)
    edges_le = np.searchsorted(HIST_EDGES, t, side="right")
    return np.clip(edges_le - 2, 0, HIST_BINS - 2)


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind='stable')`` for int64 keys; torch's stable sort gives the same
    permutation about 5x faster on this path (measured 2.1 vs 10.7 ms for 250k keys)."""
    return torch.sort(torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64)), stable=True).indices.numpy()


def protein_hash(accession: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(accession.encode(), digest_size=8).digest(), "little"))


def priority(prot_hash: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of (protein hash xor latent * phi): uniform, deterministic."""
    with np.errstate(over="ignore"):
        z = prot_hash.astype(np.uint64) ^ (latents.astype(np.uint64) * _PHI)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sparse_codes(z: torch.Tensor, row_offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, latents, values) of the non-zero entries of a dense code chunk, row-major order."""
    idx = torch.nonzero(z > 0)
    vals = z[idx[:, 0], idx[:, 1]]
    return (idx[:, 0].numpy().astype(np.int64) + row_offset, idx[:, 1].numpy().astype(np.int64),
            vals.float().numpy())


class SAEAggregate:
    def __init__(self, d_sae: int, settings: AggregateSettings | None = None) -> None:
        self.L = L = d_sae
        self.s = settings or AggregateSettings()
        self.n_proteins = 0
        self.n_residues = 0
        self.n_active_res = np.zeros(L, np.int64)
        self.n_active_prot = np.zeros(L, np.int64)
        self.sum_fx = np.zeros(L, np.int64)
        self.max_act = np.zeros(L, np.float32)
        self.hist = np.zeros((L, HIST_BINS), np.int64)
        self.aa = np.zeros((L, 20), np.int64)
        self.background = np.zeros(20, np.int64)
        self.pool = SlotPool()
        self.top = Reservoir(L, self.s.top_n, "top")
        self.sketch = Reservoir(L * HIST_BINS, self.s.per_bin, "pri")
        self.sketch_floor = np.zeros(L, np.int64)  # buckets <= floor are pooled in the floor's cell
        self.families = LabelCounter(L)
        self.types = LabelCounter(L)
        self.spills: list[str] = []
        self._pending = Columns()  # per-protein outputs since the last flush
        self._pending_acc: list[str] = []

    # ------------------------------------------------------------------ streaming
    def update(self, accessions: list[str], sequences: list[str], rows: np.ndarray, lat: np.ndarray,
               val: np.ndarray, *, mean_reps: np.ndarray | None = None, max_reps: np.ndarray | None = None,
               spans: list[list[tuple[str, str, int, int]]] | None = None,
               keep_codes: np.ndarray | None = None) -> None:
        """Fold in proteins ``accessions`` (sequences = the residues the pLM saw).

        ``rows`` index the concatenation of the sequences' residues; ``spans[i]`` lists
        ``('family'|'type', label, start, end)`` (1-based inclusive) of protein i; ``mean_reps`` /
        ``max_reps`` the proteins' raw pLM representations pooled by mean / max over residues;
        ``keep_codes[i]``: keep protein i's residue codes (``_residue_codes``).
        """
        L = self.L
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        n_prot = len(accessions)
        codes = _AA_CODE[np.frombuffer("".join(sequences).encode(), dtype=np.uint8)]
        p_of_row = np.repeat(np.arange(n_prot), lengths)
        cf = self.s.context_free
        counted = (np.arange(len(codes)) - offsets[p_of_row] >= cf) if cf else slice(None)
        self.n_proteins += n_prot
        self.n_residues += int(np.maximum(lengths - cf, 0).sum())
        self.background += np.bincount(codes[counted][codes[counted] < 20], minlength=20)

        p = p_of_row[rows]
        if cf:
            keep = rows - offsets[p] >= cf
            rows, lat, val, p = rows[keep], lat[keep], val[keep], p[keep]
        if keep_codes is not None:
            self._residue_codes(np.asarray(keep_codes, dtype=bool), lengths, offsets, rows, lat, val, p)
        order = _stable_argsort(p * L + lat)  # pairs contiguous, positions ascending
        rows, lat, val, p = rows[order], lat[order], val[order].astype(np.float32), p[order]
        pos = (rows - offsets[p]).astype(np.int32)

        self.n_active_res += np.bincount(lat, minlength=L)
        self.hist += np.bincount(lat * HIST_BINS + hist_bucket(val), minlength=L * HIST_BINS).reshape(L, HIST_BINS)
        aa_rows = codes[rows]
        ok = aa_rows < 20
        self.aa += np.bincount(lat[ok] * 20 + aa_rows[ok], minlength=L * 20).reshape(L, 20)
        if spans:
            self._count_labels(spans, offsets, rows, lat)

        if len(rows):
            key = p * L + lat
            starts = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1])
        else:
            starts = np.empty(0, np.int64)
        counts = np.diff(np.append(starts, len(rows))).astype(np.int32)
        pair_p, pair_l = p[starts], lat[starts]
        if len(starts):
            pair_max = np.maximum.reduceat(val, starts)
            pair_sum = np.add.reduceat(val.astype(np.float64), starts)
            is_max = val == np.repeat(pair_max, counts)
            pair_pos = np.minimum.reduceat(np.where(is_max, pos, np.iinfo(np.int32).max), starts)
        else:
            pair_max = np.empty(0, np.float32)
            pair_sum = np.empty(0, np.float64)
            pair_pos = np.empty(0, np.int32)
        self.n_active_prot += np.bincount(pair_l, minlength=L)
        np.add.at(self.sum_fx, pair_l, np.rint(pair_sum * FIXED_POINT).astype(np.int64))
        np.maximum.at(self.max_act, pair_l, pair_max)

        acc_arr = np.asarray(accessions, dtype=object)
        hashes = np.array([protein_hash(a) for a in accessions], dtype=np.uint64)
        pair_pri = priority(hashes[pair_p], pair_l) if len(pair_p) else np.empty(0, np.uint64)
        pair = dict(p=pair_p, l=pair_l, mx=pair_max, pos=pair_pos, n=counts, start=starts, pri=pair_pri)
        src = (pos, val)
        self._offer(self.top, pair_l, pair, acc_arr, lengths, src)
        self._collapse_sketch()
        bucket = np.maximum(hist_bucket(pair_max), self.sketch_floor[pair_l])
        self._offer(self.sketch, pair_l * HIST_BINS + bucket, pair, acc_arr, lengths, src)
        self.pool.compact([self.top, self.sketch])
        self._per_protein(accessions, lengths, pair, pair_sum, src, mean_reps, max_reps)

    def _offer(self, res: Reservoir, cells, pair, acc_arr, lengths, src) -> None:
        cand = np.flatnonzero(res.candidates(self.pool, cells, pair["mx"], pair["pri"]))
        if not len(cand):
            return
        kept, flat, evicted = res.offer(self.pool, cells[cand], pair["mx"][cand], pair["pri"][cand],
                                        acc_arr[pair["p"][cand]])
        self.pool.free(evicted)
        c = cand[kept]
        ids = self.pool.add(acc_arr[pair["p"][c]], pair["pri"][c], pair["mx"][c], pair["pos"][c] + 1,
                            pair["n"][c], lengths[pair["p"][c]], pair["start"][c], pair["n"][c], *src)
        res.slots.ravel()[flat] = ids

    def _collapse_sketch(self) -> None:
        """Pool the sketch buckets that now lie wholly below max / n_bins into the floor bucket."""
        floor = sketch_floor(self.max_act, self.s.n_bins)
        changed = np.flatnonzero(floor > self.sketch_floor)
        if not len(changed):
            return
        old, new = self.sketch_floor[changed], floor[changed]
        span = new - old + 1  # cells old..new of each changed latent, the new floor included
        cells = np.repeat(changed * HIST_BINS, span) + _segment_index(old, span)
        target = np.repeat(changed * HIST_BINS + new, span)
        ids = self.sketch.slots[cells]
        has = ids != EMPTY
        self.sketch.slots[cells] = EMPTY
        self.sketch.reoffer(self.pool, np.repeat(target, self.s.per_bin)[has.ravel()], ids[has])
        self.sketch_floor[changed] = new

    def _count_labels(self, spans, offsets, rows, lat) -> None:
        for counter_name, counter in (("family", self.families), ("type", self.types)):
            ann_rows, ann_codes = [], []
            for i, plist in enumerate(spans):
                n = offsets[i + 1] - offsets[i]
                per_label: dict[int, list[np.ndarray]] = {}
                for kind, label, start, end in plist:
                    if kind != counter_name:
                        continue
                    s, e = max(int(start), 1), min(int(end), int(n))
                    if s <= e:
                        per_label.setdefault(counter.code(label), []).append(np.arange(s - 1, e) + offsets[i])
                for code, parts in per_label.items():
                    r = np.unique(np.concatenate(parts))  # union: overlapping domains count once
                    ann_rows.append(r)
                    ann_codes.append(np.full(len(r), code, np.int64))
            if not ann_rows:
                continue
            ar = np.concatenate(ann_rows)
            ac = np.concatenate(ann_codes)
            o = _stable_argsort(ar)
            ar, ac = ar[o], ac[o]
            row_cnt = np.bincount(ar, minlength=int(offsets[-1]))
            row_start = np.concatenate([[0], np.cumsum(row_cnt)[:-1]])
            c = row_cnt[rows]
            idx = _segment_index(row_start[rows], c)
            counter.add(ac[idx], np.repeat(lat, c))

    def _residue_codes(self, keep, lengths, offsets, rows, lat, val, p) -> None:
        """The kept proteins' codes, residue by residue from the first residue after the
        context-free positions (``rows`` ascending): ``rc_p`` (the protein, as ``st_p``), ``rc_n``
        (its residues), ``rc_cnt`` (non-zero codes per residue), ``rc_l`` / ``rc_v`` (latent and
        value of each).  Analyze's concept step reads them instead of running the pLM again."""
        cf = self.s.context_free
        kept = np.flatnonzero(keep)
        n_rows = np.maximum(lengths[kept] - cf, 0)
        first = np.zeros(len(lengths), np.int64)  # each kept protein's first row among the kept rows
        first[kept] = np.cumsum(n_rows) - n_rows
        sel = keep[p]
        pp = p[sel]
        local = first[pp] + rows[sel] - offsets[pp] - cf
        small = self.L <= np.iinfo(np.uint16).max
        pend = self._pending
        pend.append("rc_p", (kept + len(self._pending_acc)).astype(np.int32))
        pend.append("rc_n", n_rows.astype(np.int32))
        pend.append("rc_cnt", np.bincount(local, minlength=int(n_rows.sum())).astype(np.uint16 if small else np.uint32))
        pend.append("rc_l", lat[sel].astype(np.uint16 if small else np.uint32))
        pend.append("rc_v", val[sel].astype(np.float32))

    def _per_protein(self, accessions, lengths, pair, pair_sum, src, mean_reps, max_reps) -> None:
        k = self.s.protein_top
        o = np.lexsort((pair["l"], -pair["mx"], pair["p"]))
        sp = pair["p"][o]
        rank = np.arange(len(o)) - np.searchsorted(sp, sp, side="left")
        t = o[rank < k]
        seg = _segment_index(pair["start"][t], pair["n"][t])
        pend = self._pending
        off = len(self._pending_acc)
        self._pending_acc += accessions
        pend.append("plen", lengths.astype(np.int32))
        if mean_reps is not None:
            pend.append("emb", np.asarray(mean_reps, dtype=np.float32))
        if max_reps is not None:
            pend.append("emb_max", np.asarray(max_reps, dtype=np.float32))
        for name, arr in (("st_p", pair["p"] + off), ("st_l", pair["l"]), ("st_max", pair["mx"]),
                          ("st_sum", pair_sum.astype(np.float32)), ("st_n", pair["n"]),
                          ("tp_p", pair["p"][t] + off), ("tp_l", pair["l"][t]), ("tp_max", pair["mx"][t]),
                          ("tp_pos", pair["pos"][t] + 1), ("tp_n", pair["n"][t]),
                          ("vec_pos", src[0][seg]), ("vec_val", src[1][seg])):
            pend.append(name, arr)

    @property
    def pending_bytes(self) -> int:
        """Bytes of per-protein outputs and (label, latent) counts gathered since the last ``flush``."""
        return self._pending.nbytes + self.families.nbytes + self.types.nbytes

    def flush(self, path: str | Path) -> None:
        """Write the per-protein outputs and the (label, latent) counts gathered since the last
        flush to ``path`` (.npz); the counts go as ``fam_*`` and ``typ_*`` arrays (``LabelCounter.drain``)."""
        if not self._pending_acc:
            return
        arrays = self._pending.arrays()
        arrays["acc"] = np.asarray(self._pending_acc, dtype=str)
        for name in ("emb", "emb_max"):  # 0 columns: no embeddings were given
            if name not in arrays:
                arrays[name] = np.zeros((len(arrays["acc"]), 0), np.float32)
        for prefix, counter in (("fam_", self.families), ("typ_", self.types)):
            arrays.update({prefix + k: v for k, v in counter.drain().items()})
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        faults.point("spill:before-rename")
        tmp.replace(path)
        self._pending.clear()
        self._pending_acc = []
        self.spills.append(str(path))

    # ------------------------------------------------------------------ merging
    def merge(self, other: "SAEAggregate") -> None:
        if other.L != self.L or asdict(other.s) != asdict(self.s):
            raise ValueError("cannot merge aggregates with different widths or settings")
        for name in ("n_active_res", "n_active_prot", "sum_fx", "hist", "aa", "background"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.max_act = np.maximum(self.max_act, other.max_act)
        self.n_proteins += other.n_proteins
        self.n_residues += other.n_residues
        self.families.merge(other.families)
        self.types.merge(other.types)
        self.spills += other.spills
        base = self.pool.absorb(other.pool)
        for mine, theirs in ((self.top, other.top), (self.sketch, other.sketch)):
            cells, ranks = np.nonzero(theirs.slots != EMPTY)
            ids = theirs.slots[cells, ranks] + base
            if mine is self.sketch:  # their pooled buckets may lie below my floor: pool them too
                lat = cells // HIST_BINS
                cells = lat * HIST_BINS + np.maximum(cells % HIST_BINS, self.sketch_floor[lat])
            mine.reoffer(self.pool, cells, ids)
        # my floor is <= the merged one, theirs too; the collapse pools everything below it
        self._collapse_sketch()
        self.pool.compact([self.top, self.sketch], force=True)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        arrays = {name: getattr(self, name) for name in
                  ("n_active_res", "n_active_prot", "sum_fx", "max_act", "hist", "aa", "background")}
        arrays["scalars"] = np.array([self.L, self.n_proteins, self.n_residues], np.int64)
        arrays["settings"] = np.array(list(asdict(self.s).values()), np.int64)
        arrays["top_slots"] = self.top.slots
        arrays["sketch_slots"] = self.sketch.slots
        arrays["sketch_floor"] = self.sketch_floor
        arrays["spills"] = np.asarray(self.spills or [""], dtype=str)[: len(self.spills)]
        arrays.update(self.pool.to_arrays("pool_"))
        arrays.update(self.families.to_arrays("fam_"))
        arrays.update(self.types.to_arrays("typ_"))
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "SAEAggregate":
        with np.load(path, allow_pickle=False) as a:
            L, n_prot, n_res = (int(x) for x in a["scalars"])
            agg = cls(L, AggregateSettings(*(int(x) for x in a["settings"])))
            for name in ("n_active_res", "n_active_prot", "sum_fx", "max_act", "hist", "aa", "background"):
                setattr(agg, name, np.array(a[name]))
            agg.n_proteins, agg.n_residues = n_prot, n_res
            agg.top.slots = state_copy(a["top_slots"])
            agg.sketch.slots = state_copy(a["sketch_slots"])
            agg.sketch_floor = np.array(a["sketch_floor"])
            agg.spills = [str(s) for s in a["spills"]]
            agg.pool = SlotPool.from_arrays(a, "pool_")
            agg.families = LabelCounter.from_arrays(a, "fam_", L)
            agg.types = LabelCounter.from_arrays(a, "typ_", L)
        return agg
