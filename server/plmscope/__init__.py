"""plmscope: a microscope for protein language models.

Data path (one module per stage):
  sequences  -> plm/        -> sae/          -> atlas/       -> store/            -> web/
  FASTA/TSV/    per-residue    sparse latents   aggregates     DuckDB schema,       routes and
  UniProt       representations                 (mergeable)    writer and reader    templates
"""

__version__ = "0.1.0"
