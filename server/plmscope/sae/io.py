"""SAEs on disk in the SAELens layout (so SAELens can load a plmscope SAE as it is).

A directory holds:

* ``cfg.json``: SAELens 6 config fields (``architecture`` 'topk'|'standard', ``d_in``, ``d_sae``, ``k``,
  ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations`` = 'none',
  ``metadata`` {model_name, hook_name, ...}) plus our ``plmscope`` object (pLM, layer, normalisation
  stats, corpus, training settings, metrics);
* ``sae_weights.safetensors``: ``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec``,
  float32, raw pLM space (normalisation folded in);
* ``sparsity.safetensors`` (optional): ``sparsity`` = log10 of each latent's firing frequency, as
  SAELens's trainer writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from .. import atomic
from ..errors import SAEError
from .model import SparseAutoencoder

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def sae_id(cfg: dict[str, Any]) -> str:
    """URL-safe id such as 'unirep-256.L1.topk4096' (a path-like pLM name keeps only its stem)."""
    p = cfg.get("plmscope", {})
    plm = Path(str(p.get("plm", cfg.get("model_name", "plm")))).name
    plm = re.sub(r"\.pt$", "", plm)
    plm = re.sub(r"[^A-Za-z0-9_-]+", "-", plm).strip("-") or "plm"
    arch = "topk" if cfg.get("architecture") == "topk" else "relu"
    return f"{plm}.L{int(p.get('layer', 0))}.{arch}{int(cfg['d_sae'])}"


def _cfg_for_saving(sae: SparseAutoencoder) -> dict[str, Any]:
    cfg = json.loads(json.dumps(sae.cfg))  # deep copy that is guaranteed JSON-serialisable
    # A model with a non-identity normalisation (trained here) records it; one loaded from disk
    # (identity, weights already folded) keeps the stats its cfg already carries.
    if float(sae.norm_scale) != 1.0 or bool(sae.norm_mean.any()):
        cfg["plmscope"]["normalization"] = sae.normalization_cfg()
    return cfg


def save_sae(sae: SparseAutoencoder, directory: str | Path, sparsity: torch.Tensor | None = None) -> Path:
    """Write cfg.json + sae_weights.safetensors (+ sparsity.safetensors) into ``directory``.

    Each file is written to a temporary name and renamed into place (weights first, cfg.json
    last), so a reader never sees a half-written file; other files in the directory (training
    checkpoint, eval.json) are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_FILENAME, lambda p: save_file(sae.raw_weights(), p, metadata={"format": "pt"}))
    if sparsity is not None:
        tensor = {"sparsity": sparsity.detach().float().cpu().contiguous()}
        _atomic_write(directory / SPARSITY_FILENAME, lambda p: save_file(tensor, p))
    text = json.dumps(_cfg_for_saving(sae), indent=1)
    _atomic_write(directory / CFG_FILENAME, lambda p: Path(p).write_text(text))
    return directory


def _atomic_write(path: Path, write) -> None:
    atomic.remove_stale(path)
    with atomic.writing(path) as tmp:
        write(str(tmp))


def update_cfg(directory: str | Path, key: str, value: Any) -> dict[str, Any]:
    """Set ``cfg['plmscope'][key] = value`` in an SAE directory's cfg.json (atomically)."""
    directory = Path(directory)
    cfg = read_cfg(directory)
    cfg["plmscope"][key] = value
    text = json.dumps(cfg, indent=1)
    _atomic_write(directory / CFG_FILENAME, lambda p: Path(p).write_text(text))
    return cfg


def read_cfg(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CFG_FILENAME
    if not directory.is_dir():
        raise SAEError(f"{directory}: no such SAE directory (expected {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    if not path.is_file():
        raise SAEError(f"{directory}: not an SAE directory, {CFG_FILENAME} is missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEError(f"{path}: corrupt JSON ({exc})") from None
    _check_cfg(cfg, str(path))
    return cfg


def _check_cfg(cfg: Any, where: str) -> None:
    if not isinstance(cfg, dict):
        raise SAEError(f"{where}: SAE cfg must be a JSON object")
    missing = [k for k in ("architecture", "d_in", "d_sae") if k not in cfg]
    if "plmscope" not in cfg or not isinstance(cfg["plmscope"], dict):
        missing.append("plmscope")
    else:
        missing += [f"plmscope.{k}" for k in ("plm", "layer") if k not in cfg["plmscope"]]
    if cfg.get("architecture") == "topk" and "k" not in cfg:
        missing.append("k")
    if missing:
        raise SAEError(f"{where}: not a plmscope SAE config, missing {', '.join(missing)}")


def _check_match(cfg: dict[str, Any], where: str, plm: str | None, layer: int | None, d_in: int | None) -> None:
    p = cfg["plmscope"]
    if plm is not None and p["plm"] != plm:
        raise SAEError(f"{where}: this SAE was trained on pLM {p['plm']!r}, not {plm!r}")
    if layer is not None and int(p["layer"]) != int(layer):
        raise SAEError(f"{where}: this SAE was trained on layer {p['layer']}, not layer {layer}")
    if d_in is not None and int(cfg["d_in"]) != int(d_in):
        raise SAEError(f"{where}: this SAE has d_in={cfg['d_in']}, but the representations have d={d_in}")


def load_sae(
    directory: str | Path,
    plm: str | None = None,
    layer: int | None = None,
    d_in: int | None = None,
    device: str | torch.device = "cpu",
) -> SparseAutoencoder:
    """Load an SAE directory; refuses (SAEError) one for another pLM/layer/d_in or with bad files."""
    directory = Path(directory)
    cfg = read_cfg(directory)
    _check_match(cfg, str(directory), plm, layer, d_in)
    wpath = directory / WEIGHTS_FILENAME
    if not wpath.is_file():
        raise SAEError(f"{directory}: {WEIGHTS_FILENAME} is missing")
    try:
        weights = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEError(f"{wpath}: corrupt safetensors file ({exc})") from None
    sae = SparseAutoencoder.from_config(cfg)
    try:
        sae.load_raw_weights(weights)
    except SAEError as exc:
        raise SAEError(f"{wpath}: {exc}") from None
    return sae.to(device).eval()


def load_sparsity(directory: str | Path) -> torch.Tensor | None:
    path = Path(directory) / SPARSITY_FILENAME
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["sparsity"]
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        raise SAEError(f"{path}: corrupt sparsity file ({exc!r})") from None


def sae_weights_bytes(sae: SparseAutoencoder) -> bytes:
    """The safetensors bytes of ``sae_weights.safetensors`` (the atlas embeds SAEs this way)."""
    return save(sae.raw_weights(), metadata={"format": "pt"})


def sae_from_bytes(cfg: dict[str, Any], weights: bytes) -> SparseAutoencoder:
    _check_cfg(cfg, "embedded SAE")
    try:
        tensors = load(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SAEError(f"embedded SAE {sae_id(cfg)}: corrupt weights ({exc})") from None
    sae = SparseAutoencoder.from_config(cfg)
    sae.load_raw_weights(tensors)
    return sae.eval()
