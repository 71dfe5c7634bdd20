"""The build-state directory: what a build has done so far, for ``--resume`` and ``plmscope merge``.

``state.json`` (the manifest: version, fingerprint of inputs and settings, shard, chunks done,
the current checkpoint), ``chunk-<c>.json.gz`` per chunk (``chunks.write_chunk``),
``sae-<id>/`` with the SAE's weights and its spill parts, and ``ckpt-<n>/`` holding each SAE's
aggregate after ``n`` chunks.  A checkpoint is written to a fresh directory and the manifest then
points at it in one atomic rename, so an interruption leaves the previous checkpoint intact.  Every
file in the state is written under a temporary name and renamed, so a process killed at any
moment leaves whole files or temporary ones, which a resumed build removes (``BuildState.clean``)
together with the checkpoint directories, chunk files and spill parts its checkpoint does not count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import faults
from ..errors import AtlasError
from ..provenance import sha256_file
from .aggregate import SAEAggregate
from .settings import BuildSettings

log = logging.getLogger(__name__)
STATE_VERSION = 4  # 2: spill parts carry emb_max; 3: aggregates leave out context-free positions; 4: residue codes


class BuildState:
    """The directory ``root``: its manifest and checkpoint directories."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def manifest_path(self) -> Path:
        return self.root / "state.json"

    def read(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write(self, manifest: dict) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, default=str))
        faults.point("state:before-rename")
        tmp.replace(self.manifest_path)

    def checkpoint_of(self, manifest: dict) -> Path | None:
        """The checkpoint directory ``manifest`` points at; None when it has none (or it is gone).
        A state moved to another machine finds its checkpoint by name under ``root``."""
        name = manifest.get("checkpoint")
        if not name:
            return None
        for ck in (Path(name), self.root / Path(name).name):
            if ck.is_dir():
                return ck
        return None

    def clean(self, ckpt: Path, aggs: list[SAEAggregate]) -> None:
        """Remove what a killed build left that the checkpoint ``ckpt`` (with aggregates ``aggs``)
        does not count: temporary files, other checkpoint directories, spill parts and chunk files
        of chunks done after it (they are redone, under the same names)."""
        keep = {(Path(p).parent.name, Path(p).name) for agg in aggs for p in agg.spills}
        done = set(json.loads(self.manifest_path.read_text()).get("chunks_done", []))
        for p in self.root.glob("ckpt-*"):
            if p.name != ckpt.name:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob("sae-*/spill-*"):
            if (p.parent.name, p.name) not in keep:
                p.unlink(missing_ok=True)
        for p in self.root.glob("chunk-*"):
            if not p.name.endswith(".json.gz") or int(p.name[6:12]) not in done:
                p.unlink(missing_ok=True)
        for p in [*self.root.rglob("*.tmp"), *self.root.rglob("*.tmp-*"), *self.root.rglob("*.tmp.npz")]:
            p.unlink(missing_ok=True)

    def ckpt_dir(self, n: int) -> Path:
        return self.root / f"ckpt-{n:06d}"

    def sae_dir(self, sae_id: str) -> Path:
        return self.root / f"sae-{sae_id}"


@dataclass(frozen=True)
class ChunkPlan:
    """The corpus' chunks (their sizes) and the ones this shard builds."""

    sizes: tuple[int, ...]
    shard: tuple[int, int]

    @property
    def mine(self) -> list[int]:
        i, n = self.shard
        return [c for c in range(len(self.sizes)) if c % n == i]

    def proteins(self, chunks) -> int:
        return sum(self.sizes[c] for c in chunks)


@dataclass
class BuildJob:
    """A build in progress: its state directory and manifest, the aggregates (one per SAE, in the
    order of ``ids``) and the chunks done so far."""

    state: BuildState
    manifest: dict
    plan: ChunkPlan
    ids: list[str]
    aggs: list[SAEAggregate]
    done: list[int] = field(default_factory=list)

    def todo(self) -> list[int]:
        done = set(self.done)
        return [c for c in self.plan.mine if c not in done]

    def checkpoint(self) -> None:
        """Aggregates into a fresh ckpt dir, then one atomic manifest update points at it."""
        ck = self.state.ckpt_dir(len(self.done))
        shutil.rmtree(ck, ignore_errors=True)
        ck.mkdir()
        for i, agg in zip(self.ids, self.aggs):
            agg.save(ck / f"{i}.npz")
        faults.point("checkpoint:saved")
        previous = self.manifest.get("checkpoint")
        self.manifest["chunks_done"] = list(self.done)
        self.manifest["checkpoint"] = str(ck)
        self.state.write(self.manifest)
        faults.point("checkpoint:switched")
        if previous and Path(previous) != ck:
            shutil.rmtree(previous, ignore_errors=True)

    @property
    def checkpointed(self) -> bool:
        """Whether every chunk done is in the last checkpoint."""
        return self.manifest["chunks_done"] == self.done


def built_from(meta: dict, fingerprint: dict, sae_ids) -> bool:
    """Whether the atlas with ``atlas_meta`` ``meta`` is (or holds, as the SAEs it added last)
    the build of ``fingerprint`` with SAEs ``sae_ids``: a build killed after publishing."""
    fp = json.loads(json.dumps(fingerprint, default=str))
    inputs = meta.get("inputs") or {}
    if "previous" in inputs and "added" in inputs:
        inputs = inputs["added"]
    settings = {k: v for k, v in (meta.get("build_settings") or {}).items() if k != "shards"}
    return inputs == fp["inputs"] and settings == fp["settings"] and set(sae_ids) <= set(meta.get("_sae_ids", []))


def resumable(old: dict | None, fingerprint: dict, shard: tuple[int, int]) -> bool:
    """Whether the state manifest ``old`` is of this plmscope and the same inputs, settings and shard."""
    return (old is not None and old.get("version") == STATE_VERSION and old.get("fingerprint") == fingerprint
            and old.get("shard") == list(shard))


def fingerprint(s: BuildSettings, sae_dirs: list[Path], plm_spec: str) -> dict:
    """The inputs (paths and content hashes) and the settings the build state belongs to."""
    inputs = {"corpus": {"path": str(s.corpus), "sha256": sha256_file(s.corpus)}, "saes": []}
    for opt in ("manifest", "pfam", "families"):
        path = getattr(s, opt)
        if path:
            inputs[opt] = {"path": str(path), "sha256": sha256_file(path)}
    if s.structures:
        d = s.structures
        listing = sorted((f.name, f.stat().st_size) for f in d.iterdir()) if d.is_dir() else []
        listing_sha = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        inputs["structures"] = {"path": str(d), "listing_sha256": listing_sha}
    for d in sae_dirs:
        inputs["saes"].append({"path": str(d), "cfg_sha256": sha256_file(d / "cfg.json"),
                               "weights_sha256": sha256_file(d / "sae_weights.safetensors")})
    return {"inputs": inputs, "settings": s.fingerprinted() | {"plm": plm_spec}}


def load_states(roots: list[Path]) -> tuple[list[dict], dict[str, SAEAggregate]]:
    """The manifests of the states in ``roots`` and, per SAE id, their aggregates merged.  The
    states must be of the same inputs and settings, finished, and cover every chunk once."""
    manifests = [read_manifest(r) for r in roots]
    _check_shards(roots, manifests)
    aggs: dict[str, SAEAggregate] = {}
    for r, m in zip(roots, manifests):
        for s in m["saes"]:
            ck = Path(m["checkpoint"])
            agg = SAEAggregate.load((ck if ck.exists() else r / ck.name) / f"{s['sae_id']}.npz")
            # spill paths are resolved inside this state dir, so states can be moved between machines
            agg.spills = [str(BuildState(r).sae_dir(s["sae_id"]) / Path(p).name) for p in agg.spills]
            if s["sae_id"] in aggs:
                aggs[s["sae_id"]].merge(agg)
            else:
                aggs[s["sae_id"]] = agg
    return manifests, aggs


def read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AtlasError(f"{root}: not a build state directory ({exc})") from None
    if manifest.get("version") != STATE_VERSION:
        raise AtlasError(f"{root}: build state version {manifest.get('version')!r}; this plmscope reads "
                         f"version {STATE_VERSION} (build the shard again)")
    return manifest


def _check_shards(roots: list[Path], manifests: list[dict]) -> None:
    fp = manifests[0]["fingerprint"]
    for r, m in zip(roots, manifests):
        if m["fingerprint"] != fp:
            raise AtlasError(f"{r}: built from other inputs or settings than {roots[0]}; cannot merge")
        missing = sorted(set(m["chunks_mine"]) - set(m["chunks_done"]))
        if missing:
            raise AtlasError(f"{r}: shard build unfinished ({len(missing)} chunks left); rerun it with --resume")
    seen: dict[int, Path] = {}
    for r, m in zip(roots, manifests):
        for c in m["chunks_done"]:
            if c in seen:
                raise AtlasError(f"chunk {c} is in both {seen[c]} and {r}; give each shard once")
            seen[c] = r
    lacking = sorted(set(range(manifests[0]["n_chunks"])) - set(seen))
    if lacking:
        raise AtlasError(f"the states cover {len(seen)} of {manifests[0]['n_chunks']} chunks; "
                         f"missing shard(s) for chunks {lacking[:10]}")
