"""Mergeable building blocks of the aggregate state: a slot pool of sparse activation vectors,
fixed-size reservoirs of slots (top-N, stratified sketch) and a sparse (label, latent) counter.

Everything is plain numpy so that a state can be saved with ``np.savez`` and merged exactly:
selection orders are total (value, then accession; or priority, then accession), so the result
never depends on the order in which proteins or shards arrive.
"""

from __future__ import annotations

import mmap

import numpy as np

EMPTY = -1


MAPPED_MIN_BYTES = 64 << 10


def state_empty(n: int, dtype) -> np.ndarray:
    """An uninitialised array for long-lived state, in an anonymous mapping of its own.

    The state's arrays are replaced now and then (growth, compaction) while a build
    streams; from malloc they would land between the batches' temporaries, and glibc's heap can
    only give back memory above its highest live block, so a build's peak RSS would creep up with
    the number of batches.  A mapping
    is returned to the OS the moment its array is freed.  Small arrays stay on the heap (a
    mapping costs a page and a kernel map entry).
    """
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    if dtype.hasobject or nbytes < MAPPED_MIN_BYTES:
        return np.empty(n, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=n)


def state_copy(a: np.ndarray) -> np.ndarray:
    out = state_empty(a.size, a.dtype).reshape(a.shape)
    out[...] = a
    return out


def state_take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[idx]`` (1-d) as a state array."""
    out = state_empty(len(idx), a.dtype)
    np.take(a, idx, out=out)
    return out


def _grow(a: np.ndarray, need: int) -> np.ndarray:
    """Capacity doubling for append-only columns (amortised O(1) per element)."""
    if need <= len(a):
        return a
    out = state_empty(max(need, 2 * len(a), 64), dtype=a.dtype)
    out[: len(a)] = a
    return out


class Columns:
    """Append-only numeric columns, emptied by ``clear`` and refilled: a spill part's pending
    per-protein outputs, a counter's pending (key, count) pairs.

    Each column is one state array (``state_empty``, at least ``MAPPED_MIN_BYTES``, so a mapping
    of its own) kept across ``clear``: after the first part or two nothing is allocated for the
    rest of the build.  Lists of per-batch arrays that live until the next spill came from the
    heap between the batches' temporaries and left holes there (the same creep as in
    ``state_empty``); they also needed a concatenating copy at every spill.  Rows of 2-d inputs
    are flattened; ``arrays`` gives them their shape back.
    """

    def __init__(self) -> None:
        self._buf: dict[str, np.ndarray] = {}
        self._used: dict[str, int] = {}
        self._row_shape: dict[str, tuple[int, ...]] = {}

    def append(self, name: str, arr) -> None:
        arr = np.asarray(arr)
        flat = arr.reshape(-1)
        used = self._used.get(name, 0)
        buf = self._buf.get(name)
        if buf is not None and buf.dtype != flat.dtype:
            raise TypeError(f"column {name!r} holds {buf.dtype}, not {flat.dtype}")
        if buf is None:  # at least MAPPED_MIN_BYTES, so that even a short column is mapped
            buf = state_empty(max(flat.size, -(-MAPPED_MIN_BYTES // flat.dtype.itemsize)), flat.dtype)
        self._buf[name] = buf = _grow(buf, used + flat.size)
        buf[used : used + flat.size] = flat
        self._used[name] = used + flat.size
        self._row_shape[name] = arr.shape[1:]

    def __len__(self) -> int:
        return sum(self._used.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the values appended since the last ``clear`` (not the buffers' capacity)."""
        return sum(n * self._buf[k].dtype.itemsize for k, n in self._used.items())

    def arrays(self) -> dict[str, np.ndarray]:
        """Views of the filled part of every column (valid until the next ``append``/``clear``)."""
        out = {}
        for k, n in self._used.items():
            out[k] = self._buf[k][:n].reshape(-1, *self._row_shape[k])
        return out

    def clear(self) -> None:
        self._used = {k: 0 for k in self._used}


class SlotPool:
    """Candidate (protein, latent) entries with their sparse activation vectors.

    A slot holds the accession, the protein's max activation for the latent, its 1-based position,
    the number of active residues, the residue count the pLM saw (``plen``), the sketch priority and
    a segment of ``vec_pos``/``vec_val`` (0-based positions, float32 values of the non-zero
    residues).  float32, not float16: the atlas promises ``|uint8 value - true| <= max/510`` and a
    float16 intermediate would add up to 2**-12 relative error on top of that.
    """

    META = {"pri": np.uint64, "max": np.float32, "pos": np.int32, "nact": np.int32, "plen": np.int32,
            "off": np.int64, "n": np.int32, "alive": np.bool_}

    def __init__(self) -> None:
        self.size = 0
        self.meta = {k: np.empty(0, dtype=t) for k, t in self.META.items()}
        self.acc = np.empty(0, dtype=object)
        self.vec_pos = np.empty(0, dtype=np.int32)
        self.vec_val = np.empty(0, dtype=np.float32)
        self.vec_used = 0
        self.dead_values = 0

    # ---- adding / freeing
    def add(self, acc, pri, mx, pos, nact, plen, seg_start, seg_n, src_pos, src_val) -> np.ndarray:
        """Append slots; their vectors are segments ``[seg_start, seg_start+seg_n)`` of src arrays."""
        k = len(seg_n)
        ids = np.arange(self.size, self.size + k, dtype=np.int64)
        new_size = self.size + k
        for name in self.META:
            self.meta[name] = _grow(self.meta[name], new_size)
        self.acc = _grow(self.acc, new_size)
        total = int(seg_n.sum())
        idx = _segment_index(seg_start, seg_n)
        self.vec_pos = _grow(self.vec_pos, self.vec_used + total)
        self.vec_val = _grow(self.vec_val, self.vec_used + total)
        self.vec_pos[self.vec_used : self.vec_used + total] = src_pos[idx]
        self.vec_val[self.vec_used : self.vec_used + total] = src_val[idx]
        offs = self.vec_used + np.concatenate([[0], np.cumsum(seg_n)[:-1]]).astype(np.int64)
        s = slice(self.size, new_size)
        m = self.meta
        m["pri"][s], m["max"][s], m["pos"][s], m["nact"][s] = pri, mx, pos, nact
        m["plen"][s], m["off"][s], m["n"][s], m["alive"][s] = plen, offs, seg_n, True
        self.acc[s] = acc
        self.vec_used += total
        self.size = new_size
        return ids

    def free(self, ids: np.ndarray) -> None:
        ids = ids[ids >= 0]
        if len(ids):
            self.meta["alive"][ids] = False
            self.dead_values += int(self.meta["n"][ids].sum())

    def get(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Field ``name`` of slots ``ids`` (EMPTY ids give the field's 'empty' value)."""
        if name == "acc":
            out = np.full(len(ids), "", dtype=object)
            src = self.acc
        else:
            empty = {"max": -np.inf, "pri": np.iinfo(np.uint64).max}.get(name, 0)
            out = np.full(len(ids), empty, dtype=self.META[name])
            src = self.meta[name]
        ok = ids >= 0
        out[ok] = src[ids[ok]]
        return out

    def dense(self, slot: int) -> np.ndarray:
        """The full float32 vector of one slot (length = residues the pLM saw)."""
        m = self.meta
        v = np.zeros(int(m["plen"][slot]), dtype=np.float32)
        o, n = int(m["off"][slot]), int(m["n"][slot])
        v[self.vec_pos[o : o + n]] = self.vec_val[o : o + n]
        return v

    def compact(self, reservoirs: list["Reservoir"], force: bool = False) -> None:
        """Drop dead slots and their vectors; renumber slots in ``reservoirs``."""
        if not force and self.dead_values <= max(self.vec_used // 2, 1 << 20):
            return
        alive = np.flatnonzero(self.meta["alive"][: self.size])
        remap = np.full(self.size + 1, EMPTY, dtype=np.int64)  # last entry maps EMPTY (-1)
        remap[alive] = np.arange(len(alive))
        m = self.meta
        idx = _segment_index(m["off"][alive], m["n"][alive])
        self.vec_pos = state_take(self.vec_pos, idx)
        self.vec_val = state_take(self.vec_val, idx)
        self.vec_used = len(idx)
        self.meta = {k: state_take(v, alive) for k, v in m.items() if k != "off"}
        off = self.meta["off"] = state_empty(len(alive), np.int64)  # vectors now lie end to end
        if len(alive):
            off[0] = 0
            np.cumsum(self.meta["n"][:-1], dtype=np.int64, out=off[1:])
        self.acc = self.acc[alive].copy()
        self.size = len(alive)
        self.dead_values = 0
        for r in reservoirs:
            r.slots = state_take(remap, r.slots.ravel()).reshape(r.slots.shape)

    def absorb(self, other: "SlotPool") -> int:
        """Append every live slot of ``other``; returns the id offset to apply to its reservoirs."""
        base = self.size
        n = other.size
        for name in self.META:
            self.meta[name] = _grow(self.meta[name], base + n)
            self.meta[name][base : base + n] = other.meta[name][:n]
        self.meta["off"][base : base + n] += self.vec_used
        self.acc = _grow(self.acc, base + n)
        self.acc[base : base + n] = other.acc[:n]
        self.vec_pos = _grow(self.vec_pos, self.vec_used + other.vec_used)
        self.vec_val = _grow(self.vec_val, self.vec_used + other.vec_used)
        self.vec_pos[self.vec_used : self.vec_used + other.vec_used] = other.vec_pos[: other.vec_used]
        self.vec_val[self.vec_used : self.vec_used + other.vec_used] = other.vec_val[: other.vec_used]
        self.vec_used += other.vec_used
        self.dead_values += other.dead_values
        self.size += n
        return base

    # ---- persistence
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}{k}": v[: self.size] for k, v in self.meta.items()}
        out[f"{prefix}acc"] = np.asarray(list(self.acc[: self.size]) or [""], dtype=str)[: self.size]
        out[f"{prefix}vec_pos"] = self.vec_pos[: self.vec_used]
        out[f"{prefix}vec_val"] = self.vec_val[: self.vec_used]
        out[f"{prefix}dead"] = np.array([self.dead_values])
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "SlotPool":
        p = cls()
        p.meta = {k: state_copy(np.asarray(arrays[f"{prefix}{k}"], dtype=t)) for k, t in cls.META.items()}
        p.size = len(p.meta["pri"])
        p.acc = np.array([str(a) for a in arrays[f"{prefix}acc"]], dtype=object)
        p.vec_pos = state_copy(arrays[f"{prefix}vec_pos"])
        p.vec_val = state_copy(arrays[f"{prefix}vec_val"])
        p.vec_used = len(p.vec_pos)
        p.dead_values = int(arrays[f"{prefix}dead"][0])
        return p


def _segment_index(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s+c)`` for every (s, c), without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(counts)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - counts), counts)
    return np.arange(total, dtype=np.int64) + shift


class Reservoir:
    """``n_cells`` cells of ``k`` slot ids, each cell keeping the k best entries.

    ``mode='top'``: best = highest max activation, ties -> smaller accession.
    ``mode='pri'``: best = lowest priority hash, ties -> smaller accession.
    Rows stay sorted best-first so that ``threshold`` is the k-th entry.
    """

    def __init__(self, n_cells: int, k: int, mode: str) -> None:
        self.k = k
        self.mode = mode
        self.slots = state_empty(n_cells * k, np.int64).reshape(n_cells, k)
        self.slots.fill(EMPTY)

    def candidates(self, pool: SlotPool, cells: np.ndarray, mx: np.ndarray, pri: np.ndarray) -> np.ndarray:
        """Mask of new entries that may enter (cheap pre-filter; ties are resolved in ``offer``)."""
        last = self.slots[cells, self.k - 1]
        if self.mode == "top":
            return mx >= pool.get("max", last)
        return pri <= pool.get("pri", last)

    def offer(self, pool: SlotPool, cells, mx, pri, acc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Insert candidate entries; returns (index of kept candidates, their (cell, rank) flat
        positions in ``slots``, slot ids evicted).  The caller allocates slots for the kept ones."""
        if len(cells) == 0:
            e = np.empty(0, dtype=np.int64)
            return e, e, e
        touched = np.unique(cells)
        ex_slots = self.slots[touched].ravel()
        all_cells = np.concatenate([np.repeat(touched, self.k), cells])
        all_src = np.concatenate([np.full(len(ex_slots), EMPTY), np.arange(len(cells))])
        all_max = np.concatenate([pool.get("max", ex_slots), mx.astype(np.float32)])
        all_pri = np.concatenate([pool.get("pri", ex_slots), pri.astype(np.uint64)])
        all_acc = np.concatenate([pool.get("acc", ex_slots), np.asarray(acc, dtype=object)])
        empty = np.concatenate([ex_slots == EMPTY, np.zeros(len(cells), bool)])
        primary = -all_max if self.mode == "top" else all_pri
        order = np.lexsort((all_acc, primary, empty, all_cells))
        s_cells = all_cells[order]
        rank = np.arange(len(order)) - np.searchsorted(s_cells, s_cells, side="left")
        keep = rank < self.k
        kept = order[keep]
        flat = s_cells[keep] * self.k + rank[keep]
        new_slots = np.concatenate([ex_slots, np.full(len(cells), EMPTY)])
        self.slots.ravel()[flat] = new_slots[kept]
        dropped = order[~keep]
        evicted = new_slots[dropped[dropped < len(ex_slots)]]
        is_new = all_src[kept] >= 0
        return all_src[kept][is_new], flat[is_new], evicted[evicted >= 0]


    def reoffer(self, pool: SlotPool, cells: np.ndarray, ids: np.ndarray) -> None:
        """Offer existing pool slots ``ids`` to ``cells`` (e.g. when cells merge); slots that do not
        make it, or are evicted, are freed."""
        if not len(ids):
            return
        kept, flat, evicted = self.offer(pool, cells, pool.get("max", ids), pool.get("pri", ids), pool.get("acc", ids))
        self.slots.ravel()[flat] = ids[kept]
        lost = np.ones(len(ids), bool)
        lost[kept] = False
        pool.meta["alive"][ids[kept]] = True
        pool.free(ids[lost])
        pool.free(evicted)


class LabelCounter:
    """Sparse counts of (label, latent) pairs since the last ``drain``, e.g. active residues inside
    each Pfam family.

    The aggregate drains its counters into every spill part, so a counter holds the pairs of one
    part (a few hundred proteins) and the build's memory does not grow with the distinct pairs
    of the whole corpus (up to labels x latents); the write phase sums the parts in DuckDB (``store.writer.rank_labels``).
    Label codes are local to a counter and reset by ``drain``: every part carries its own labels.
    """

    # Batches' (key, count) pairs wait in ``_pending`` until this many keys, then are summed
    # into the sorted unique key set: bounds the sort temporaries and the number of small arrays.
    PENDING_KEYS = 1 << 16

    def __init__(self, n_latents: int) -> None:
        self.n_latents = n_latents
        self._pending = Columns()  # keys, counts; its buffers outlive drains
        self._reset()

    def _reset(self) -> None:
        self.vocab: dict[str, int] = {}
        self.labels: list[str] = []
        self._keys = np.empty(0, np.int64)  # label_code * n_latents + latent, sorted, unique
        self._counts = np.empty(0, np.int64)
        self._pending.clear()

    def code(self, label: str) -> int:
        c = self.vocab.get(label)
        if c is None:
            c = self.vocab[label] = len(self.labels)
            self.labels.append(label)
        return c

    def add(self, codes: np.ndarray, latents: np.ndarray) -> None:
        """Count one for each (label code, latent) pair given (repeats allowed)."""
        if len(codes):
            k, c = np.unique(codes.astype(np.int64) * self.n_latents + latents, return_counts=True)
            self.add_keys(k, c)

    def add_keys(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` of ``keys`` (any order, repeats allowed)."""
        self._pending.append("keys", np.asarray(keys, dtype=np.int64))
        self._pending.append("counts", np.asarray(counts, dtype=np.int64))
        if self._pending.nbytes > 16 * self.PENDING_KEYS:
            self.compact()

    def compact(self) -> None:
        if not len(self._pending):
            return
        pend = self._pending.arrays()
        keys = np.concatenate([self._keys, pend["keys"]])
        counts = np.concatenate([self._counts, pend["counts"]])
        self._pending.clear()
        # the sorted set lives until the next drain, across batches: state arrays (see Columns)
        uniq, inv = np.unique(keys, return_inverse=True)
        self._keys = state_copy(uniq)
        self._counts = state_empty(len(uniq), np.int64)
        self._counts[:] = np.bincount(inv.ravel(), weights=counts, minlength=len(uniq))

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._counts.nbytes + self._pending.nbytes

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(label code, latent, count) of every pair counted, sorted by code then latent."""
        self.compact()
        codes, lat = np.divmod(self._keys, self.n_latents)
        return codes, lat, self._counts.copy()

    def drain(self) -> dict[str, np.ndarray]:
        """The counts as spill arrays (``labels``: str; ``code``, ``latent``: int32; ``n``: int64)
        and a fresh start, codes included."""
        codes, lat, n = self.table()
        out = {"labels": np.asarray(self.labels or [""], dtype=str)[: len(self.labels)],
               "code": codes.astype(np.int32), "latent": lat.astype(np.int32), "n": n}
        self._reset()
        return out

    def merge(self, other: "LabelCounter") -> None:
        codes, lat, n = other.table()
        if len(n):
            remap = np.array([self.code(lab) for lab in other.labels], dtype=np.int64)
            self.add_keys(remap[codes] * self.n_latents + lat, n)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        codes, lat, n = self.table()
        return {f"{prefix}keys": codes * self.n_latents + lat, f"{prefix}counts": n,
                f"{prefix}labels": np.asarray(self.labels or [""], dtype=str)[: len(self.labels)]}

    @classmethod
    def from_arrays(cls, arrays, prefix: str, n_latents: int) -> "LabelCounter":
        c = cls(n_latents)
        for lab in arrays[f"{prefix}labels"]:
            c.code(str(lab))
        c.add_keys(np.array(arrays[f"{prefix}keys"], dtype=np.int64), np.array(arrays[f"{prefix}counts"], dtype=np.int64))
        c.compact()
        return c
