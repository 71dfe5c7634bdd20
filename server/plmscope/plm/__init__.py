"""Stage 2: protein language models -> per-residue representations at one layer."""

from .base import ProteinLM, load_plm

__all__ = ["ProteinLM", "load_plm"]
