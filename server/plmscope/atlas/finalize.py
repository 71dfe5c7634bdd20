"""Turn a finished ``SAEAggregate`` into atlas table columns (numpy arrays, ready for the writer).

Activation vectors become uint8 blobs scaled by the latent's corpus max (``vocab.quantize``); quantile
bins are fixed once the max is known: bin i = [i*M/n, (i+1)*M/n), the last one closed.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..store.schema import HIST_BINS
from ..vocab import code_values, quantize
from ._state import EMPTY, _segment_index
from .aggregate import FIXED_POINT, HIST_EDGES, SAEAggregate


def bin_index(values: np.ndarray, scale: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bin of protein maxima ``values`` for latents with maxima ``scale`` (same shapes)."""
    s = np.where(scale > 0, scale.astype(np.float64), 1.0)
    return np.clip((values.astype(np.float64) * n_bins / s).astype(np.int64), 0, n_bins - 1)


# Residues per piece when vectors are quantised into blobs (a few tens of MB of temporaries): the
# write phase's peak memory then does not depend on how many examples an atlas has.
BLOB_PIECE_RESIDUES = 4_000_000


def _pieces(plen: np.ndarray, budget: int = BLOB_PIECE_RESIDUES) -> list[slice]:
    """Consecutive slices of rows whose lengths add up to about ``budget`` residues each."""
    if not len(plen):
        return []
    piece = np.cumsum(plen.astype(np.int64)) // budget
    cuts = np.flatnonzero(np.diff(piece)) + 1
    bounds = np.concatenate([[0], cuts, [len(plen)]])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _blobs(vec_pos, vec_val, seg_off, seg_n, plen, scale) -> np.ndarray:
    """uint8 blobs (object array of bytes) of sparse vectors, each scaled by its own ``scale``."""
    if len(plen) and int(np.sum(plen, dtype=np.int64)) > BLOB_PIECE_RESIDUES:
        return np.concatenate([_blobs(vec_pos, vec_val, seg_off[p], seg_n[p], plen[p], scale[p])
                               for p in _pieces(plen)])
    plen = plen.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(plen)[:-1]]).astype(np.int64)
    seg = _segment_index(seg_off, seg_n)
    # quantise the non-zero values only (zeros stay code 0), then scatter the codes
    codes = quantize(vec_val[seg], np.repeat(scale, seg_n))
    q = np.zeros(int(plen.sum()), np.uint8)
    q[np.repeat(starts, seg_n) + vec_pos[seg]] = codes
    out = np.empty(len(plen), dtype=object)
    for i, (a, n) in enumerate(zip(starts.tolist(), plen.tolist())):
        out[i] = q[a : a + n].tobytes()
    return out


def _examples(agg: SAEAggregate, sae_id: str, kind, lat, bins, ranks, ids) -> Iterator[dict]:
    """latent_examples columns, in pieces of about ``BLOB_PIECE_RESIDUES`` residues."""
    pool = agg.pool
    m = pool.meta
    for p in _pieces(m["plen"][ids]):
        i, la = ids[p], lat[p]
        yield {
            "sae_id": sae_id, "latent": la.astype(np.int32), "kind": kind[p],
            "bin": bins[p], "rank": ranks[p].astype(np.int32), "accession": pool.acc[i], "max_act": m["max"][i],
            "max_pos": m["pos"][i], "n_active": m["nact"][i],
            "activations": _blobs(pool.vec_pos, pool.vec_val, m["off"][i], m["n"][i], m["plen"][i], agg.max_act[la]),
        }


def bin_counts(agg: SAEAggregate) -> np.ndarray:
    """Exact number of proteins per (latent, quantile bin), from the per-protein statistics."""
    n = agg.s.n_bins
    counts = np.zeros(agg.L * n, np.int64)
    for path in agg.spills:
        with np.load(path) as a:
            lat, mx = a["st_l"], a["st_max"]
            counts += np.bincount(lat * n + bin_index(mx, agg.max_act[lat], n), minlength=agg.L * n)
    return counts.reshape(agg.L, n)


# (spill prefix, label table, its label column, the latents table's top label and frac columns)
LABEL_COLUMNS = (("fam_", "latent_families", "family", "top_family", "top_family_frac"),
                 ("typ_", "latent_annotation_types", "type", "top_annotation_type", "top_annotation_frac"))


def label_parts(agg: SAEAggregate, prefix: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(labels, code, latent, n) of the (label, latent) counts in every spill part, then of the
    counts still in memory (none after a build; a state merged in may hold some).  ``prefix``:
    ``fam_`` (Pfam families) or ``typ_`` (annotation types)."""
    for path in agg.spills:
        with np.load(path) as a:
            yield a[prefix + "labels"], a[prefix + "code"], a[prefix + "latent"], a[prefix + "n"]
    counter = agg.families if prefix == "fam_" else agg.types
    codes, lat, n = counter.table()
    if len(n):
        yield np.asarray(counter.labels, dtype=str), codes.astype(np.int32), lat.astype(np.int32), n


def neighbors(W_dec: torch.Tensor, sae_id: str, k: int = 10, chunk: int = 1024) -> dict:
    """Top-k decoder-direction cosine neighbours of every latent (itself excluded)."""
    W = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    L = W.shape[0]
    k = min(k, L - 1)
    lat, nb, cos = [], [], []
    for a in range(0, L, chunk):
        sim = W[a : a + chunk] @ W.T
        idx = torch.arange(a, min(a + chunk, L))
        sim[idx - a, idx] = -float("inf")
        v, i = torch.topk(sim, k, dim=1)
        lat.append(np.repeat(idx.numpy(), k))
        nb.append(i.numpy().ravel())
        cos.append(v.numpy().ravel())
    lat = np.concatenate(lat) if lat else np.empty(0, np.int64)
    return {"sae_id": sae_id, "latent": lat.astype(np.int32),
            "rank": np.tile(np.arange(k, dtype=np.int32), L), "neighbor": np.concatenate(nb).astype(np.int32),
            "cosine": np.concatenate(cos).astype(np.float32)}


def latent_tables(agg: SAEAggregate, sae_id: str, top_labels: dict[str, np.ndarray]) -> Iterator[tuple[str, dict]]:
    """(table, columns) of latents, latent_bins and latent_examples; the examples come in several
    pieces (bounded memory), the rest whole.  ``top_labels``: the latents table's ``top_family``,
    ``top_family_frac``, ``top_annotation_type`` and ``top_annotation_frac`` columns, from the
    label tables (``store.writer.rank_labels``), which are ranked before this runs."""
    L, s = agg.L, agg.s
    n_res, n_prot = max(agg.n_residues, 1), max(agg.n_proteins, 1)
    dead = agg.n_active_res == 0
    mean = np.where(dead, 0.0, (agg.sum_fx / FIXED_POINT) / np.maximum(agg.n_active_res, 1))
    latents = {
        "sae_id": sae_id, "latent": np.arange(L, dtype=np.int32),
        "max_act": agg.max_act, "mean_act": mean.astype(np.float32), "n_active_residues": agg.n_active_res,
        "n_active_proteins": agg.n_active_prot, "frac_residues": agg.n_active_res / n_res,
        "frac_proteins": agg.n_active_prot / n_prot, "is_dead": dead,
        "hist_counts": _rows_as_lists(agg.hist), "aa_counts": _rows_as_lists(agg.aa),
        **{k: top_labels[k] for k in ("top_family", "top_family_frac", "top_annotation_type", "top_annotation_frac")},
    }
    yield "latents", latents
    # top examples: reservoir rows are already sorted strongest first
    t_lat, t_rank = np.nonzero(agg.top.slots != EMPTY)
    t_ids = agg.top.slots[t_lat, t_rank]
    # quantile-bin samples from the stratified sketch
    cells, _ = np.nonzero(agg.sketch.slots != EMPTY)
    ids = agg.sketch.slots[agg.sketch.slots != EMPTY]
    b_lat = cells // HIST_BINS
    mx = agg.pool.meta["max"][ids]
    b = bin_index(mx, agg.max_act[b_lat], s.n_bins)
    acc = agg.pool.acc[ids].astype(str)
    o = np.lexsort((acc, agg.pool.meta["pri"][ids], b, b_lat))
    grp = b_lat[o] * s.n_bins + b[o]
    keep = o[(np.arange(len(o)) - np.searchsorted(grp, grp, side="left")) < s.per_bin]
    o2 = keep[np.lexsort((acc[keep], -mx[keep], b[keep], b_lat[keep]))]
    grp2 = b_lat[o2] * s.n_bins + b[o2]
    rank2 = np.arange(len(o2)) - np.searchsorted(grp2, grp2, side="left")
    n_top, n_bin = len(t_ids), len(o2)
    yield from (("latent_examples", part) for part in _examples(
        agg, sae_id, np.array(["top"] * n_top + ["bin"] * n_bin, dtype=object),
        np.concatenate([t_lat, b_lat[o2]]),
        np.concatenate([np.full(n_top, None, dtype=object), b[o2].astype(object)]),
        np.concatenate([t_rank, rank2]), np.concatenate([t_ids, ids[o2]]).astype(np.int64)))
    # bins: exact counts, only for latents that fired
    counts = bin_counts(agg)
    live = np.flatnonzero(~dead)
    nb = s.n_bins
    M = agg.max_act[live].astype(np.float64)
    bins = {
        "sae_id": sae_id, "latent": np.repeat(live, nb).astype(np.int32),
        "bin": np.tile(np.arange(nb, dtype=np.int32), len(live)),
        "lo": (np.repeat(M, nb) * np.tile(np.arange(nb), len(live)) / nb).astype(np.float32),
        "hi": (np.repeat(M, nb) * np.tile(np.arange(1, nb + 1), len(live)) / nb).astype(np.float32),
        "n_proteins": counts[live].ravel(),
    }
    yield "latent_bins", bins


def _rows_as_lists(a: np.ndarray) -> np.ndarray:
    out = np.empty(len(a), dtype=object)
    for i in range(len(a)):
        out[i] = a[i]
    return out


def protein_tables(agg: SAEAggregate, sae_id: str) -> Iterator[dict[str, dict]]:
    """protein_latents / protein_latent_stats / protein_embeddings, one spill file at a time."""
    for path in agg.spills:
        with np.load(path) as a:
            acc = a["acc"].astype(object)
            stats = {"sae_id": sae_id, "accession": acc[a["st_p"]], "latent": a["st_l"].astype(np.int32),
                     "max_act": a["st_max"], "sum_act": a["st_sum"], "n_active": a["st_n"].astype(np.int32)}
            tp, tl = a["tp_p"], a["tp_l"]
            rank = np.arange(len(tp)) - np.searchsorted(tp, tp, side="left")
            n = a["tp_n"]
            off = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
            top = {"sae_id": sae_id, "accession": acc[tp], "rank": rank.astype(np.int32),
                   "latent": tl.astype(np.int32), "max_act": a["tp_max"], "max_pos": a["tp_pos"].astype(np.int32),
                   "n_active": n.astype(np.int32),
                   "activations": _blobs(a["vec_pos"], a["vec_val"], off, n, a["plen"][tp], agg.max_act[tl])}
            out = {"protein_latents": top, "protein_latent_stats": stats}
            emb, emb_max = a["emb"], a["emb_max"]
            if emb.shape[1]:
                if emb_max.shape != emb.shape:
                    raise ValueError(f"{path}: mean and max embeddings differ in shape ({emb.shape} vs {emb_max.shape})")
                out["protein_embeddings"] = {"sae_id": sae_id, "accession": acc,
                                             "mean_rep": _rows_as_lists(emb), "max_rep": _rows_as_lists(emb_max)}
            yield out


def residue_code_tables(agg: SAEAggregate, sae_id: str) -> Iterator[dict]:
    """residue_codes rows of the concept proteins (``SAEAggregate._residue_codes``), one spill
    file at a time: per protein its non-zero codes per residue, latents and values as blobs, the
    values float16 where they fit (``vocab.code_values``)."""
    for path in agg.spills:
        with np.load(path) as a:
            if "rc_p" not in a.files:
                continue
            acc, n, cnt, lat, val = a["acc"][a["rc_p"]], a["rc_n"].astype(np.int64), a["rc_cnt"], a["rc_l"], a["rc_v"]
            row_end = np.cumsum(n)
            nz = np.concatenate([[0], np.cumsum(cnt, dtype=np.int64)])
            lo, hi = nz[row_end - n], nz[row_end]
            counts, latents, values, kinds = (np.empty(len(acc), dtype=object) for _ in range(4))
            for i in range(len(acc)):
                v = code_values(val[lo[i] : hi[i]])
                counts[i] = cnt[row_end[i] - n[i] : row_end[i]].tobytes()
                latents[i] = lat[lo[i] : hi[i]].tobytes()
                values[i], kinds[i] = v.tobytes(), v.dtype.name
            yield {"sae_id": sae_id, "accession": acc.astype(object), "n_rows": n.astype(np.int32),
                   "row_counts": counts, "latents": latents, "activations": values, "value_type": kinds}


def sae_stats(agg: SAEAggregate) -> dict:
    return {"n_dead": int((agg.n_active_res == 0).sum()), "n_proteins": agg.n_proteins,
            "n_residues": agg.n_residues, "context_free": agg.s.context_free, "hist_edges": HIST_EDGES.tolist(),
            "aa_background": agg.background.tolist()}
