"""Sparse autoencoders: model (TopK+AuxK, ReLU+L1), SAELens-layout I/O, training and evaluation."""

from .io import load_sae, load_sparsity, read_cfg, sae_from_bytes, sae_id, sae_weights_bytes, save_sae
from .model import SparseAutoencoder, make_cfg

__all__ = [
    "SparseAutoencoder",
    "make_cfg",
    "save_sae",
    "load_sae",
    "load_sparsity",
    "read_cfg",
    "sae_weights_bytes",
    "sae_from_bytes",
    "sae_id",
]
