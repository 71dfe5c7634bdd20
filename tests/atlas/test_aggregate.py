"""The aggregator on synthetic sparse codes: brute-force checks and exact shard merging."""

import duckdb
import numpy as np
import pytest

from plmscope.atlas.aggregate import AggregateSettings, SAEAggregate
from plmscope.atlas.finalize import LABEL_COLUMNS, label_parts, latent_tables, protein_tables
from plmscope.store import schema
from plmscope.store.writer import rank_labels
from plmscope.vocab import AMINO_ACIDS as AA
from plmscope.vocab import dequantize, quantize

L = 24


def _corpus(n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(5, 60))
        seq = "".join(rng.choice(list(AA), length))
        z = np.zeros((length, L), np.float32)
        for r in range(length):  # a TopK-like code: 3 latents per residue
            lat = rng.choice(L, 3, replace=False)
            z[r, lat] = rng.choice([0.5, 1.0, 2.0, 3.0], 3) * rng.random(3).round(2)  # ties on purpose
        spans = [("family", "PF0000%d" % (i % 3), 2, 10), ("type", "Pfam domain", 2, 10), ("type", "helix", 5, 20)]
        out.append((f"P{i:05d}", seq, z, spans))
    return out


def _feed(agg, items, tmp_path, tag, group=7):
    for g in range(0, len(items), group):
        batch = items[g : g + group]
        z = np.concatenate([b[2] for b in batch])
        rows, lat = np.nonzero(z)
        agg.update([b[0] for b in batch], [b[1] for b in batch], rows, lat, z[rows, lat],
                   mean_reps=np.stack([b[2].mean(0) for b in batch]), max_reps=np.stack([b[2].max(0) for b in batch]),
                   spans=[b[3] for b in batch])
        agg.flush(tmp_path / f"{tag}-{g}.npz")


def _tables(agg, scratch):
    """Every table the atlas gets from ``agg``; the label tables are ranked by the writer's SQL in
    an in-memory DuckDB, as in a build."""
    con = duckdb.connect()
    schema.create_all(con)
    top, label_tables = {}, []
    for prefix, table, column, top_col, frac_col in LABEL_COLUMNS:
        top[top_col], top[frac_col] = rank_labels(con, table, column, "s", label_parts(agg, prefix),
                                                  agg.n_active_res, agg.s.label_top, scratch_dir=scratch)
        label_tables.append({table: con.execute(f"SELECT * FROM {table}").fetchnumpy()})
    t = {}
    for part in [dict([pair]) for pair in latent_tables(agg, "s", top)] + list(protein_tables(agg, "s")) + label_tables:
        for name, cols in part.items():
            t.setdefault(name, {k: [] for k in cols})
            n = max(len(v) for v in cols.values() if not isinstance(v, str))
            for k, v in cols.items():  # a str column (sae_id) is one value for every row
                t[name][k].extend([v] * n if isinstance(v, str) else list(v))
    return t


def _canon(t):
    out = {}
    for name, cols in t.items():
        keys = list(cols)
        rows = list(zip(*[[x.tolist() if isinstance(x, np.ndarray) else x for x in cols[k]] for k in keys]))
        out[name] = sorted(map(repr, rows))
    return out


def test_merge_equals_one_pass(tmp_path):
    items = _corpus()
    s = AggregateSettings(top_n=4, n_bins=3, per_bin=2, protein_top=3)
    one = SAEAggregate(L, s)
    _feed(one, items, tmp_path, "one")
    shards = [SAEAggregate(L, s) for _ in range(3)]
    order = np.random.default_rng(1).permutation(len(items))
    for k, sh in enumerate(shards):
        _feed(sh, [items[i] for i in order[k::3]], tmp_path, f"sh{k}", group=5)
    shards[0].save(tmp_path / "state.npz")
    merged = SAEAggregate.load(tmp_path / "state.npz")
    merged.merge(shards[1])
    merged.merge(shards[2])
    assert _canon(_tables(one, tmp_path / "scratch")) == _canon(_tables(merged, tmp_path / "scratch"))


def test_against_brute_force(tmp_path):
    items = _corpus(seed=3)
    s = AggregateSettings(top_n=5, n_bins=4, per_bin=3, protein_top=4, label_top=2)  # 3 families: a cut
    agg = SAEAggregate(L, s)
    _feed(agg, items, tmp_path, "bf")
    t = _tables(agg, tmp_path / "scratch")
    pmax = np.array([it[2].max(0) for it in items])  # (proteins, L)
    lat_t = t["latents"]
    for l in range(L):
        col = pmax[:, l]
        assert lat_t["max_act"][l] == pytest.approx(col.max())
        assert lat_t["n_active_proteins"][l] == (col > 0).sum()
        nres = sum(int((it[2][:, l] > 0).sum()) for it in items)
        assert lat_t["n_active_residues"][l] == nres == sum(lat_t["hist_counts"][l])
        # top examples: highest max, ties by accession
        order = sorted(range(len(items)), key=lambda i: (-col[i], items[i][0]))[: s.top_n]
        ex = [i for i, (ll, kind) in enumerate(zip(t["latent_examples"]["latent"], t["latent_examples"]["kind"]))
              if ll == l and kind == "top"]
        got = [t["latent_examples"]["accession"][i] for i in sorted(ex, key=lambda i: t["latent_examples"]["rank"][i])]
        assert got == [items[i][0] for i in order if col[i] > 0]
    # bins hold what they say
    ex = t["latent_examples"]
    for i in range(len(ex["latent"])):
        if ex["kind"][i] != "bin":
            continue
        l, b = ex["latent"][i], ex["bin"][i]
        M = lat_t["max_act"][l]
        assert b * M / s.n_bins - 1e-6 <= ex["max_act"][i] <= (b + 1) * M / s.n_bins + 1e-6
    bins = t["latent_bins"]
    for i in range(len(bins["latent"])):
        l, b = bins["latent"][i], bins["bin"][i]
        M = float(lat_t["max_act"][l])
        col = pmax[:, l]
        brute = int(((col > 0) & (np.minimum((col * s.n_bins / M).astype(int), s.n_bins - 1) == b)).sum())
        assert bins["n_proteins"][i] == brute
    # uint8 round trip
    for i in range(len(ex["latent"])):
        acc = ex["accession"][i]
        it = next(x for x in items if x[0] == acc)
        true = it[2][:, ex["latent"][i]]
        M = float(lat_t["max_act"][ex["latent"][i]])
        q = np.frombuffer(ex["activations"][i], np.uint8)
        assert len(q) == len(true)
        assert np.array_equal(q, quantize(true, M))  # finalize encodes with vocab.quantize
        assert np.abs(dequantize(q, M) - true).max() <= M / 510 + 1e-7
    # (label, latent) counts: active residues inside each label's spans (a residue once per label),
    # the label_top largest per latent, ties by label; the latents table names the first
    for table, column, kind, top_col in (("latent_families", "family", "family", "top_family"),
                                         ("latent_annotation_types", "type", "type", "top_annotation_type")):
        counts = {}
        for it in items:
            for label in {sp[1] for sp in it[3] if sp[0] == kind}:
                inside = np.zeros(len(it[1]), bool)
                for k2, lab2, a, b in it[3]:
                    if k2 == kind and lab2 == label:
                        inside[a - 1 : b] = True
                for l in range(L):
                    n = int(((it[2][:, l] > 0) & inside).sum())
                    if n:
                        counts[(l, label)] = counts.get((l, label), 0) + n
        lt = t[table]
        got = sorted(zip(lt["latent"], lt[column], lt["n_residues"], lt["frac"]))
        expect = []
        for l in range(L):
            ranked = sorted(((lab, n) for (ll, lab), n in counts.items() if ll == l), key=lambda x: (-x[1], x[0]))
            expect += [(l, lab, n, n / lat_t["n_active_residues"][l]) for lab, n in ranked[: s.label_top]]
            assert lat_t[top_col][l] == (ranked[0][0] if ranked else None)
        assert [g[:3] for g in got] == sorted(e[:3] for e in expect)
        assert np.allclose([g[3] for g in got], [e[3] for e in sorted(expect)])
    # per-protein top latents
    pl = t["protein_latents"]
    for j, it in enumerate(items):
        expect = sorted(range(L), key=lambda l: (-pmax[j, l], l))[: s.protein_top]
        expect = [l for l in expect if pmax[j, l] > 0]
        got = [pl["latent"][i] for i in sorted((i for i, a in enumerate(pl["accession"]) if a == it[0]),
                                                 key=lambda i: pl["rank"][i])]
        assert got == expect



def test_sketch_collapse_keeps_the_defined_bin_samples_in_bounded_cells(tmp_path):
    """Maxima that grow over five decades as proteins stream in: the sketch pools buckets below
    max / n_bins, stays within the buckets of [max / n_bins, max] plus one per latent, and the bin
    samples are exactly the definition's (recomputed here from all proteins)."""
    from plmscope.atlas._state import EMPTY
    from plmscope.atlas.aggregate import HIST_EDGES, hist_bucket, priority, protein_hash
    from plmscope.atlas.finalize import bin_index

    rng = np.random.default_rng(5)
    s = AggregateSettings(top_n=3, n_bins=5, per_bin=2, protein_top=3)
    n_lat, n = 6, 300
    items = []
    for i in range(n):
        length = int(rng.integers(4, 20))
        z = np.zeros((length, n_lat), np.float32)
        scale = 10 ** (-3 + 5 * i / n)  # later proteins reach higher
        for r in range(length):
            lat = rng.choice(n_lat, 2, replace=False)
            z[r, lat] = (rng.random(2) * scale).astype(np.float32)
        items.append((f"Q{i:05d}", "".join(rng.choice(list(AA), length)), z, []))
    agg = SAEAggregate(n_lat, s)
    _feed(agg, items, tmp_path, "c", group=9)
    M = agg.max_act.astype(np.float64)
    for l in range(n_lat):
        cells = np.flatnonzero((agg.sketch.slots[l * 56:(l + 1) * 56] != EMPTY).any(1))
        lo = np.searchsorted(HIST_EDGES, M[l] / s.n_bins, side="right") - 2
        assert len(cells) <= (hist_bucket(np.array([M[l]]))[0] - lo) + 1
    t = _tables(agg, tmp_path / "scratch")
    ex = t["latent_examples"]
    got = {(int(l), int(b), a) for l, k, b, a in zip(ex["latent"], ex["kind"], ex["bin"], ex["accession"]) if k == "bin"}
    accs = [it[0] for it in items]
    pmax = np.array([it[2].max(0) for it in items])
    hashes = np.array([protein_hash(a) for a in accs], dtype=np.uint64)
    want = set()
    for l in range(n_lat):
        act = np.flatnonzero(pmax[:, l] > 0)
        pri = priority(hashes[act], np.full(len(act), l))
        # candidates: the per_bin lowest (priority, accession) of every log bucket
        cand = []
        for bucket in np.unique(hist_bucket(pmax[act, l])):
            members = [j for j in range(len(act)) if hist_bucket(pmax[act[j:j + 1], l])[0] == bucket]
            cand += sorted(members, key=lambda j: (int(pri[j]), accs[act[j]]))[: s.per_bin]
        bins = bin_index(pmax[act, l], np.full(len(act), M[l]), s.n_bins)
        for b in range(s.n_bins):
            inside = sorted((j for j in cand if bins[j] == b), key=lambda j: (int(pri[j]), accs[act[j]]))
            want |= {(l, b, accs[act[j]]) for j in inside[: s.per_bin]}
    assert got == want
    assert (agg.sketch_floor > 0).all()  # the collapse really happened
